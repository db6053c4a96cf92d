"""The offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages)`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from zizhu.engine.llm_engine import LLMEngine
from zizhu.errors import EmptyPromptError, InvalidRequestError
from zizhu.outputs import RequestOutput
from zizhu.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Load a DeepSeek checkpoint (a local directory or a Hugging Face id) and generate with it.

    Engine options: dtype ("auto", "float32", "bfloat16", ...), max_model_len, kv_cache_memory
    (bytes, or a fraction of free memory), max_num_seqs, max_num_batched_tokens, block_size,
    enable_prefix_caching, quantization ("int8": weight-only, at load), platform, seed.
    """

    def __init__(self, model: str | Path, dtype: str = "auto", **engine_kwargs: Any):
        self.engine = LLMEngine.from_model(model, dtype=dtype, **engine_kwargs)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results come back in prompt order."""
        prompt_list = self._as_list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise InvalidRequestError(f"{len(params_list)} sampling params for {len(prompt_list)} prompts")
        order = []
        try:
            for prompt, p in zip(prompt_list, params_list):
                request_id = str(next(self._ids))
                if isinstance(prompt, str):
                    if not prompt:
                        raise EmptyPromptError("the prompt is empty: give some text or token ids", param="prompt")
                    self._need_tokenizer()
                    self.engine.add_request(request_id, self.tokenizer.encode(prompt), p, prompt=prompt)
                else:
                    self.engine.add_request(request_id, list(prompt), p)
                order.append(request_id)
        except Exception:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Render one conversation (or a list of them) with the checkpoint's chat format and generate."""
        self._need_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})),
                add_special_tokens=False,
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
        except BaseException:
            # an interrupt or a failed step: drop this call's requests, so that their cache blocks
            # are free and a later call does not resume them
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [done[request_id] for request_id in order]

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise InvalidRequestError("this checkpoint has no tokenizer.json: pass token id lists instead of text")

    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        return prompts
