"""The step loop: admit requests, schedule, run the model, sample, detokenize, report.

`LLMEngine` is synchronous and single-threaded by design; `AsyncLLMEngine` (async_engine.py)
drives it from an event loop for the server, and `LLM` (zizhu/llm.py) from plain Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zizhu.config import EngineConfig, ModelConfig
from zizhu.engine.kv_cache import BlockManager
from zizhu.engine.request import Request
from zizhu.engine.runner import ModelRunner
from zizhu.engine.sampler import SampledLogprobs, Sampler
from zizhu.engine.scheduler import Scheduler
from zizhu.errors import ConfigError, EmptyPromptError, InvalidRequestError, PromptTooLongError
from zizhu.loader import load_model, resolve_model_path
from zizhu.outputs import CompletionOutput, Logprob, RequestOutput
from zizhu.platforms import Platform, get_platform
from zizhu.sampling_params import SamplingParams
from zizhu.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_used: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int

    @property
    def kv_cache_usage(self) -> float:
        return self.num_blocks_used / max(self.num_blocks_total, 1)


@dataclass
class _Parent:
    """A user request: its n sequences and what has been reported for them."""

    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""  # final text up to any stop string
    hold_back: int = 0  # chars withheld while running: they may begin a stop string


class LLMEngine:
    def __init__(
        self,
        model_dir: Path,
        model_config: ModelConfig,
        engine_config: EngineConfig,
        dtype: torch.dtype,
        platform: Platform,
        tokenizer: Tokenizer | None,
        seed: int = 0,
    ):
        engine_config.validate()
        self.model_config = model_config
        self.engine_config = engine_config
        self.platform = platform
        self.dtype = dtype
        self.kv_dtype = _resolve_kv_dtype(engine_config.kv_cache_dtype, dtype, engine_config.quantization, platform)
        self.tokenizer = tokenizer
        platform.configure()
        self.model = load_model(model_dir, model_config, platform, dtype, engine_config.quantization)
        self.max_model_len, num_blocks = self._size_kv_cache()
        bs = engine_config.block_size
        kv_caches = platform.allocate_kv_cache(
            model_config.num_hidden_layers, num_blocks, bs, model_config.kv_latent_dim, self.kv_dtype
        )
        self.block_manager = BlockManager(num_blocks, bs, engine_config.enable_prefix_caching)
        max_batched = engine_config.max_num_batched_tokens or 2048
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs, max_batched)
        self.runner = ModelRunner(self.model, kv_caches, bs, platform)
        self.sampler = Sampler(model_config.eos_token_ids, seed=seed, argmax=platform.argmax)
        self.parents: dict[str, _Parent] = {}
        self.text_states: dict[str, _TextState] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        logger.info(
            "KV cache: %d blocks x %d tokens, %d B/token (%s), max_model_len %d",
            num_blocks, bs, self.kv_bytes_per_token, str(self.kv_dtype).removeprefix("torch."), self.max_model_len,
        )

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        dtype: str | torch.dtype = "auto",
        platform: str | Platform | None = None,
        seed: int = 0,
        load_tokenizer: bool = True,
        **engine_kwargs,
    ) -> "LLMEngine":
        model_dir = resolve_model_path(model)
        model_config = ModelConfig.from_dir(model_dir)
        plat = platform if isinstance(platform, Platform) else get_platform(platform)
        tokenizer = None
        if load_tokenizer and (model_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer(model_dir, model_config.model_type)
        return cls(model_dir, model_config, EngineConfig(**engine_kwargs), _resolve_dtype(dtype, model_config, plat), plat, tokenizer, seed)

    # ------------------------------------------------------------------ sizing
    @property
    def kv_bytes_per_token(self) -> int:
        return self.model_config.kv_bytes_per_token(torch.empty(0, dtype=self.kv_dtype).element_size())

    def _size_kv_cache(self) -> tuple[int, int]:
        cfg, ecfg = self.model_config, self.engine_config
        if ecfg.max_model_len is not None and ecfg.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {ecfg.max_model_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}"
            )
        max_len = ecfg.max_model_len or cfg.max_position_embeddings
        per_token = self.kv_bytes_per_token
        bs = ecfg.block_size
        budget = ecfg.kv_cache_memory
        if budget is None:
            blocks_per_seq = -(-max_len // bs)  # a sequence occupies whole blocks
            wanted = per_token * bs * blocks_per_seq * ecfg.max_num_seqs
            budget = min(wanted, int(self.platform.available_memory() * 0.25))
        elif isinstance(budget, float):
            budget = int(self.platform.available_memory() * budget)
        num_blocks = int(budget) // (per_token * bs)
        if num_blocks * bs < max_len:
            if ecfg.max_model_len is not None:
                raise ConfigError(
                    f"the KV cache ({int(budget)} B, {num_blocks * bs} tokens) cannot hold one sequence of "
                    f"max_model_len {max_len} ({per_token * max_len} B needed): raise kv_cache_memory or lower max_model_len"
                )
            if num_blocks < 1:
                raise ConfigError(f"kv_cache_memory {int(budget)} B is smaller than one block ({per_token * bs} B)")
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache", max_len, num_blocks * bs)
            max_len = num_blocks * bs
        return max_len, num_blocks

    # ------------------------------------------------------------------ requests
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        if request_id in self.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_token_ids = list(prompt_token_ids)
        self._validate_prompt(prompt_token_ids, params)
        arrival = time.monotonic()
        children = []
        for i in range(params.n):
            child = Request(
                request_id=f"{request_id}#{i}" if params.n > 1 else request_id,
                parent_id=request_id,
                index=i,
                prompt_token_ids=prompt_token_ids,
                params=params,
                arrival=arrival,
                logprobs=[] if params.logprobs is not None else None,
            )
            if params.seed is not None:
                child.generator = torch.Generator().manual_seed(params.seed + i)
            children.append(child)
            if self.tokenizer is not None:
                self.text_states[child.request_id] = _TextState(
                    IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                    hold_back=0 if params.include_stop_str_in_output else max((len(s) for s in params.stop), default=1) - 1,
                )
            self.scheduler.add(child)
        self.parents[request_id] = _Parent(prompt, prompt_token_ids, children)
        self.prompt_tokens_total += len(prompt_token_ids)

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise EmptyPromptError("the prompt is empty: give at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        limit = self.max_model_len
        wanted = len(ids) + (params.max_tokens or 1)
        if len(ids) >= limit or wanted > limit:
            asked = f" plus max_tokens {params.max_tokens}" if params.max_tokens else ""
            raise PromptTooLongError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {len(ids)} tokens{asked}",
                prompt_tokens=len(ids),
                limit=limit,
            )
        if self.tokenizer is None and params.stop:
            raise InvalidRequestError("stop strings need a tokenizer; this engine was loaded without one", param="stop")

    def abort_request(self, request_id: str) -> None:
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            if not child.finished:
                self.scheduler.finish(child)
            self.text_states.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_used_blocks,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            prefix_cache_query_tokens=bm.prefix_query_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        hidden, sample_rows = self.runner.run(batch)
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
            self.block_manager.register_full_blocks(request)
        touched: dict[str, None] = {}
        if sample_rows:
            sampled = [batch.requests[i] for i in sample_rows]
            tokens, logprobs = self.sampler.sample(self.model, hidden, sampled)
            for request, token, lp in zip(sampled, tokens, logprobs):
                self._append_token(request, token, lp)
                touched[request.parent_id] = None
        return [self._output(pid) for pid in touched if pid in self.parents]

    def _append_token(self, request: Request, token: int, lp: SampledLogprobs | None) -> None:
        request.output_token_ids.append(token)
        self.generation_tokens_total += 1
        params = request.params
        if lp is not None:
            request.logprobs.append(self._logprob_entry(token, lp))
        state = self.text_states.get(request.request_id)
        if state is not None:
            new_text = state.detokenizer.add(token)
            state.text += new_text
            if params.stop and new_text and self._check_stop_strings(request, state, len(new_text)):
                return
        if not params.ignore_eos and token in self.model_config.eos_token_ids:
            self._finish(request, "stop", None)
        elif token in params.stop_token_ids:
            self._finish(request, "stop", token)
        elif params.max_tokens is not None and len(request.output_token_ids) >= params.max_tokens:
            self._finish(request, "length", None)
        elif request.num_tokens >= self.max_model_len:
            self._finish(request, "length", None)

    def _check_stop_strings(self, request: Request, state: _TextState, new_len: int) -> bool:
        text = state.text
        for stop in request.params.stop:
            at = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
            if at >= 0:
                state.text = text[: at + len(stop)] if request.params.include_stop_str_in_output else text[:at]
                self._finish(request, "stop", stop)
                return True
        return False

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None) -> None:
        request.finish_reason = reason
        request.stop_reason = stop_reason
        self.scheduler.finish(request)

    def _logprob_entry(self, token: int, lp: SampledLogprobs) -> dict[int, Logprob]:
        decode = self._token_text
        entry = {token: Logprob(lp.chosen, lp.rank, decode(token))}
        for rank, (tid, value) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1):
            entry.setdefault(tid, Logprob(value, rank, decode(tid)))
        return entry

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else ""

    def _output(self, parent_id: str) -> RequestOutput:
        parent = self.parents[parent_id]
        outputs = []
        for child in parent.children:
            state = self.text_states.get(child.request_id)
            text = ""
            if state is not None:
                text = state.text
                if not child.finished and state.hold_back:
                    text = text[: max(0, len(text) - state.hold_back)]
            outputs.append(
                CompletionOutput(
                    index=child.index,
                    text=text,
                    token_ids=list(child.output_token_ids),
                    finish_reason=child.finish_reason,
                    stop_reason=child.stop_reason,
                    logprobs=list(child.logprobs) if child.logprobs is not None else None,
                )
            )
        finished = all(c.finished for c in parent.children)
        out = RequestOutput(
            request_id=parent_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=parent.children[0].num_cached_tokens,
        )
        if finished:
            self.parents.pop(parent_id)
            for child in parent.children:
                self.text_states.pop(child.request_id, None)
        return out


def _resolve_kv_dtype(
    kv_cache_dtype: str | torch.dtype, dtype: torch.dtype, quantization: str | None, platform: Platform
) -> torch.dtype:
    """The latent cache's dtype. By default the model's, but bf16 for an int8 model (as llama.cpp
    caches F16 for its 8-bit files): its weights are rounded far more coarsely than bf16 rounds a
    latent. On the tiny benchmark checkpoint that cost 1.6% more KL from the fp32 model, for half
    the cache and 4-5% more tokens/s at 32 streams on small. A wider cache (fp32 for a bf16 model)
    keeps every cached latent exact, for twice the bytes."""
    bf16_ok = torch.bfloat16 in platform.supported_dtypes()
    auto = torch.bfloat16 if quantization == "int8" and bf16_ok else dtype
    return _named_dtype(kv_cache_dtype, auto, "kv_cache_dtype", platform)


def _resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, platform: Platform) -> torch.dtype:
    return _named_dtype(dtype, platform.default_dtype(DTYPES.get(cfg.torch_dtype or "")), "dtype", platform)


def _named_dtype(value: str | torch.dtype, auto: torch.dtype, what: str, platform: Platform) -> torch.dtype:
    if isinstance(value, torch.dtype):
        resolved = value
    elif value == "auto":
        resolved = auto
    elif value in DTYPES:
        resolved = DTYPES[value]
    else:
        raise ConfigError(f"unknown {what} {value!r} (choose from auto, {', '.join(sorted(DTYPES))})")
    if resolved not in platform.supported_dtypes():
        raise ConfigError(f"platform {platform.name} does not support {what} {resolved}")
    return resolved
