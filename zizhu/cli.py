"""The `zizhu` command: serve an OpenAI-compatible API, chat in the terminal, or generate once.

    zizhu serve    [MODEL] [--host H] [--port P] [--api-key K] ...
    zizhu chat     [MODEL]
    zizhu generate [MODEL] "PROMPT"

MODEL is a checkpoint directory or a Hugging Face model id; without it, the small demo model that
ships with zizhu is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from zizhu.errors import InvalidRequestError, ZizhuError

logger = logging.getLogger("zizhu")

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


class CLIError(ZizhuError):
    """A problem the user can fix from the command line."""


# ---------------------------------------------------------------- arguments


def _memory(text: str) -> int | float:
    """'4GiB', '512MB', '1000000' (bytes) or '0.5' (a fraction of free memory)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB, 512MB or 0.5)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if not unit:
        return number if number <= 1 else int(number)
    base = 1024 if "I" in unit else 1000
    return int(number * base ** ("KMGT".index(unit[0]) + 1))


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", help="weights and KV-cache dtype: auto, float32, bfloat16, float16")
    group.add_argument("--kv-cache-dtype", default="auto",
                       help="KV-cache dtype when it should differ from --dtype: auto, float32, bfloat16, float16")
    group.add_argument("--max-model-len", type=int, help="longest prompt + completion, in tokens (default: the model's)")
    group.add_argument("--kv-cache-memory", type=_memory, help="KV-cache size: bytes, e.g. 4GiB, or a fraction of free memory")
    group.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together in one step (default 64)")
    group.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step (prefill chunks + decodes)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prompt prefixes")
    group.add_argument("--quantization", choices=["int8"], help="quantize linear and expert weights at load (int8: weight-only)")
    group.add_argument("--platform", help="device platform (default: detected; see ZIZHU_PLATFORM)")
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zizhu",
        description="Run DeepSeek models (V2, V3, R1, V3.1, ...) locally. "
        "Without MODEL, each command uses the small demo model bundled with zizhu.",
        epilog='examples:\n  zizhu generate "Once upon a time"\n  zizhu chat deepseek-ai/DeepSeek-V2-Lite-Chat\n'
        "  zizhu serve ./my-checkpoint --port 8000 --api-key secret",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model_help = "checkpoint directory or Hugging Face model id (default: the bundled demo model)"

    serve = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API), plus /health, "
        "/metrics (Prometheus) and interactive docs at /docs.",
    )
    serve.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("ZIZHU_API_KEY"), help="require 'Authorization: Bearer KEY' (or set ZIZHU_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME", help="model name(s) clients use (default: MODEL)")
    serve.add_argument("--max-waiting", type=int, help="requests allowed to wait for a slot; beyond it clients get HTTP 503")
    serve.add_argument("--tool-call-parser", default="auto", choices=["auto", "none", "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4"],
                       help="tool-call syntax to parse (default: detected from the checkpoint)")
    serve.add_argument("--reasoning-parser", default="auto", choices=["auto", "none", "deepseek_r1"],
                       help="return <think>...</think> as reasoning_content (default: when the vocabulary has </think>)")
    _add_engine_args(serve)

    chat = commands.add_parser("chat", help="chat in the terminal", description="Chat with a model in the terminal; replies stream as they are generated, reasoning dimmed. Type /reset to start over, /exit to leave.")
    chat.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None, help="thinking mode on/off (models that have one)")
    _add_sampling_args(chat, max_tokens=1024)
    _add_engine_args(chat)

    generate = commands.add_parser("generate", help="complete one prompt and print it", description="Print the model's continuation of PROMPT as it is generated.")
    generate.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model, then the prompt text")
    generate.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    _add_sampling_args(generate, max_tokens=512)
    _add_engine_args(generate)
    return parser


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default {max_tokens})")
    group.add_argument("--temperature", type=float, help="0 for greedy (default: the model's generation_config, else 0.6)")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's generation_config, else 0.95)")
    group.add_argument("--seed", type=int, help="seed for reproducible sampling")


# ---------------------------------------------------------------- engine


def resolve_model(model: str | None) -> str:
    """The MODEL argument, or the bundled demo model when none is given."""
    if model:
        return model
    try:
        from zizhu.demo import DEMO_MODEL_DIR
    except ImportError as exc:
        raise CLIError(
            "no MODEL given and the bundled demo model is not available in this install (zizhu.demo is missing); "
            "pass a checkpoint directory or a Hugging Face model id"
        ) from exc
    if not Path(DEMO_MODEL_DIR).is_dir():
        raise CLIError(
            f"no demo model in {DEMO_MODEL_DIR}: pass a MODEL, or train one with "
            f"python -m zizhu.demo.train --out {DEMO_MODEL_DIR}"
        )
    return str(DEMO_MODEL_DIR)


def build_engine(args: argparse.Namespace):
    model = resolve_model(args.model)
    from zizhu.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(
        model,
        dtype=args.dtype,
        platform=args.platform,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if engine.tokenizer is None:
        raise CLIError(f"{model} has no tokenizer.json; zizhu needs the checkpoint's tokenizer to take text")
    return engine


def _sampling(args: argparse.Namespace, engine):
    """Flags first, then the checkpoint's generation_config, then 0.6 / 0.95 (DeepSeek's advice)."""
    from zizhu.sampling_params import SamplingParams

    defaults = {"temperature": 0.6, "top_p": 0.95, **engine.model_config.generation_defaults}
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=defaults["temperature"] if args.temperature is None else args.temperature,
        top_p=defaults["top_p"] if args.top_p is None else args.top_p,
        top_k=defaults.get("top_k", 0),
        seed=args.seed,
    )


def stream_text(engine, prompt_ids: list[int], params, prompt: str | None = None) -> Iterator[str]:
    """Run one request on a synchronous engine, yielding new text as it is generated. A terminal user
    gets what fits: max_tokens is cut to the context left after the prompt, not refused."""
    room = engine.max_model_len - len(prompt_ids)
    if params.max_tokens is not None and 0 < room < params.max_tokens:
        params = dataclasses.replace(params, max_tokens=room)
    request_id = uuid.uuid4().hex
    engine.add_request(request_id, prompt_ids, params, prompt)
    sent = 0
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if output.finished:
                    return
    finally:
        engine.abort_request(request_id)


# ---------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from zizhu.engine.async_engine import AsyncLLMEngine
    from zizhu.server.app import build_app
    from zizhu.server.serving import ServingConfig

    engine = build_engine(args)
    names = args.served_model_name or [args.model or "zizhu-demo"]
    config = ServingConfig.for_engine(engine, names, args.tool_call_parser, args.reasoning_parser)
    app = build_app(AsyncLLMEngine(engine, max_waiting=args.max_waiting), config, api_key=args.api_key)
    print(f"zizhu: serving {', '.join(names)} on http://{args.host}:{args.port}/v1 (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def cmd_generate(args: argparse.Namespace) -> None:
    if len(args.args) > 2:
        raise CLIError('generate takes [MODEL] "PROMPT": quote the prompt so it is one argument')
    args.model, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    engine = build_engine(args)
    tokenizer = engine.tokenizer
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    for piece in stream_text(engine, ids, _sampling(args, engine), prompt):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from zizhu.server.reasoning import ReasoningParser, prompt_opens_thinking

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    engine = build_engine(args)
    tokenizer = engine.tokenizer
    params = _sampling(args, engine)
    color = sys.stdout.isatty()
    dim, bold, reset = (DIM, BOLD, RESET) if color else ("", "", "")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    template_kwargs = {} if args.thinking is None else {"thinking": args.thinking}
    print("Type a message; /reset starts over, /exit (or Ctrl-D) leaves.", file=sys.stderr)
    while True:
        try:
            line = input(f"{bold}>>> {reset}")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(system + history, add_generation_prompt=True, **template_kwargs)
        parser = ReasoningParser(prompt_opens_thinking(prompt))
        answer = []
        try:
            for piece in stream_text(engine, tokenizer.encode(prompt, add_special_tokens=False), params, prompt):
                delta = parser.feed(piece)
                _show(delta, answer, dim, reset)
            _show(parser.finish(), answer, dim, reset)
        except KeyboardInterrupt:
            print(f"{reset}\n[interrupted]", file=sys.stderr)
        except InvalidRequestError as exc:
            print(f"{reset}error: {exc}", file=sys.stderr)
            history.pop()
            continue
        print(reset)
        history.append({"role": "assistant", "content": "".join(answer)})


def _show(delta, answer: list[str], dim: str, reset: str) -> None:
    if delta.reasoning:
        sys.stdout.write(f"{dim}{delta.reasoning}{reset}")
    if delta.content:
        sys.stdout.write(delta.content)
        answer.append(delta.content)
    sys.stdout.flush()


COMMANDS = {"serve": cmd_serve, "chat": cmd_chat, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except ZizhuError as exc:
        print(f"zizhu: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
