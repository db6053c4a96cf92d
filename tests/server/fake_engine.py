"""A scripted stand-in for the engine: the reply is chosen by the prompt, one character per token.

The user message `REPLY:<text>` makes the fake model answer `<text>` (then EOS); anything else gets
"hello world". Tokens are single characters, DeepSeek's marker strings are single tokens, so tests
control exactly where streamed chunks split.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from zizhu.errors import EmptyPromptError, PromptTooLongError, QueueFullError
from zizhu.outputs import CompletionOutput, Logprob, RequestOutput
from zizhu.sampling_params import SamplingParams

SPECIAL = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
]
CHAR_BASE = 100


class FakeTokenizer:
    bos_token_id, eos_token_id = 0, 1
    chat_template = None
    vocab_size = CHAR_BASE + 0x110000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        i = 0
        while i < len(text):
            special = next((s for s in SPECIAL if text.startswith(s, i)), None)
            if special is not None:
                ids.append(SPECIAL.index(special))
                i += len(special)
            else:
                ids.append(CHAR_BASE + ord(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = []
        for t in ids:
            if t < CHAR_BASE:
                if not (skip_special_tokens and t in (0, 1)):
                    out.append(SPECIAL[t])
            else:
                out.append(chr(t - CHAR_BASE))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return SPECIAL.index(token) if token in SPECIAL else None

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, thinking=False, **_):
        text = SPECIAL[0]
        for m in messages:
            if m["role"] == "user":
                text += "<｜User｜>" + m["content"]
            elif m["role"] == "assistant":
                text += "<｜Assistant｜>" + (m.get("content") or "") + SPECIAL[1]
            else:
                text += m.get("content") or ""
        if add_generation_prompt:
            text += "<｜Assistant｜>" + ("<think>" if thinking else "")
        return text


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_used: int
    prefix_cache_hit_tokens: int = 0


class FakeModelConfig:
    model_type = "deepseek_v3"
    generation_defaults: dict = {}


class FakeEngine:
    """Only what the server touches: tokenizer, limits, stats."""

    def __init__(self, max_model_len: int = 256):
        self.tokenizer = FakeTokenizer()
        self.model_config = FakeModelConfig()
        self.max_model_len = max_model_len
        self.active: set[str] = set()

    def stats(self) -> FakeStats:
        return FakeStats(num_running=len(self.active), num_waiting=0, num_blocks_total=100, num_blocks_used=len(self.active))


class FakeAsyncEngine:
    def __init__(self, max_model_len: int = 256, max_active: int = 1000, step_delay: float = 0.0):
        self.engine = FakeEngine(max_model_len)
        self.max_active = max_active
        self.step_delay = step_delay
        self.aborted: list[str] = []

    def reply_for(self, prompt_ids: list[int]) -> str:
        text = self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        marker = text.rfind("REPLY:")
        if marker < 0:
            return "hello world"
        return text[marker + len("REPLY:") :].split("<｜Assistant｜>")[0]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None):
        tok = self.engine.tokenizer
        if not prompt_token_ids:
            raise EmptyPromptError("the prompt is empty", param="prompt")
        limit = self.engine.max_model_len
        if len(prompt_token_ids) + (params.max_tokens or 1) > limit:
            raise PromptTooLongError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {len(prompt_token_ids)} tokens",
                prompt_tokens=len(prompt_token_ids),
                limit=limit,
            )
        if len(self.engine.active) >= self.max_active:
            raise QueueFullError("the waiting queue is full")
        script = tok.encode(self.reply_for(prompt_token_ids), add_special_tokens=False) + [tok.eos_token_id]
        self.engine.active.add(request_id)
        outputs = [CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        finished = False
        try:
            for token in script:
                await asyncio.sleep(self.step_delay)
                for out in outputs:
                    if out.finished:
                        continue
                    out.token_ids.append(token)
                    if out.logprobs is not None:
                        out.logprobs.append(self._logprobs(token, params.logprobs))
                    if token == tok.eos_token_id and not params.ignore_eos:
                        out.finish_reason = "stop"
                    else:
                        out.text += tok.decode([token], skip_special_tokens=params.skip_special_tokens)
                        stop = next((s for s in params.stop if s in out.text), None)
                        if stop is not None:
                            out.text = out.text[: out.text.index(stop)]
                            out.finish_reason = "stop"
                        elif params.max_tokens is not None and len(out.token_ids) >= params.max_tokens:
                            out.finish_reason = "length"
                finished = all(o.finished for o in outputs)
                yield RequestOutput(
                    request_id=request_id,
                    prompt=prompt,
                    prompt_token_ids=list(prompt_token_ids),
                    outputs=[CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason, None, list(o.logprobs) if o.logprobs is not None else None) for o in outputs],
                    finished=finished,
                )
                if finished:
                    return
        finally:
            self.engine.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.active.discard(request_id)
        self.aborted.append(request_id)

    def _logprobs(self, token: int, top_n: int) -> dict[int, Logprob]:
        tok = self.engine.tokenizer
        entry = {token: Logprob(-0.5, 1, tok.decode([token], skip_special_tokens=False))}
        for rank in range(2, top_n + 1):
            other = CHAR_BASE + ord("a") + rank
            entry.setdefault(other, Logprob(-1.0 * rank, rank, tok.decode([other])))
        return entry

    async def shutdown(self) -> None:
        pass
