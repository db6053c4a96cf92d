"""POST /v1/completions: one engine request per prompt, choices numbered prompt-major as OpenAI does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from zizhu.errors import InvalidRequestError
from zizhu.outputs import CompletionOutput
from zizhu.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, now, random_id
from zizhu.server.serving import Generation, ResponseHeader, ServingContext, new_positions, sampling_params


class CompletionChoiceState:
    def __init__(self, index: int, prefix: str, top_logprobs: int | None):
        self.index = index
        self.prefix = prefix  # the echoed prompt, sent before the first generated text
        self.text_sent = 0
        self.tokens_seen = 0
        self.offset = len(prefix)  # text_offset of the next token
        self.top_logprobs = top_logprobs  # None: no logprobs requested
        self.finished = False

    def update(self, output: CompletionOutput) -> tuple[str, CompletionLogprobs | None, str | None]:
        text = self.prefix + output.text[self.text_sent :]
        self.prefix = ""
        self.text_sent = len(output.text)
        positions = new_positions(output, self.tokens_seen)
        self.tokens_seen = len(output.token_ids)
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
            for token_id, position in positions:
                chosen = position[token_id]
                logprobs.tokens.append(chosen.decoded_token)
                logprobs.token_logprobs.append(chosen.logprob)
                ranked = sorted(position.values(), key=lambda lp: lp.rank)[: self.top_logprobs]
                logprobs.top_logprobs.append({lp.decoded_token: lp.logprob for lp in ranked})
                logprobs.text_offset.append(self.offset)
                self.offset += len(chosen.decoded_token)
        finish_reason = None
        if output.finished and not self.finished:
            self.finished = True
            finish_reason = output.finish_reason
        return text, logprobs, finish_reason


class CompletionHandler:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def _prompts(self, request: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """(token ids, prompt text or None for token-id prompts) per prompt."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append((self.ctx.tokenizer.encode(item, add_special_tokens=True), item))
            else:
                prompts.append((list(item), None))
        return prompts

    def _echo(self, request: CompletionRequest, ids: list[int], text: str | None) -> str:
        if not request.echo:
            return ""
        return text if text is not None else self.ctx.tokenizer.decode(ids, skip_special_tokens=False)

    def _check_unsupported(self, request: CompletionRequest) -> None:
        if request.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequestError("best_of other than n is not supported", param="best_of")
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError("echo with logprobs (prompt logprobs) is not supported", param="echo")

    async def create(self, request: CompletionRequest):
        """Returns a CompletionResponse, or an async iterator of chunks when streaming."""
        model = self.ctx.served_name(request.model)
        self._check_unsupported(request)
        prompts = self._prompts(request)
        params = sampling_params(request, request.max_tokens, request.logprobs, self.ctx.generation_defaults)
        request_id = random_id("cmpl")
        generation = await self.ctx.start(
            "completions", [(f"{request_id}-{i}", ids, params, text) for i, (ids, text) in enumerate(prompts)]
        )
        states = {
            (p, i): CompletionChoiceState(p * request.n + i, self._echo(request, ids, text), request.logprobs)
            for p, (ids, text) in enumerate(prompts)
            for i in range(request.n)
        }
        header = ResponseHeader(request_id, now(), model)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self._stream(header, generation, states, include_usage)
        return await self._complete(header, generation, states)

    async def _complete(self, header: ResponseHeader, generation: Generation, states) -> CompletionResponse:
        async with aclosing(generation.outputs()) as outputs:
            async for _ in outputs:
                pass
        choices = []
        for p, final in enumerate(generation.finals):
            for o in final.outputs:
                state = states[p, o.index]
                text, logprobs, finish_reason = state.update(o)
                choices.append(CompletionChoice(index=state.index, text=text, logprobs=logprobs, finish_reason=finish_reason))
        return CompletionResponse(
            id=header.id,
            created=header.created,
            model=header.model,
            choices=sorted(choices, key=lambda c: c.index),
            usage=generation.usage(),
        )

    async def _stream(self, header: ResponseHeader, generation: Generation, states, include_usage: bool) -> AsyncIterator[CompletionResponse]:
        def chunk(choices: list[CompletionChoice], usage=None) -> CompletionResponse:
            return CompletionResponse(id=header.id, created=header.created, model=header.model, choices=choices, usage=usage)

        async with aclosing(generation.outputs()) as outputs:
            async for p, output in outputs:
                for o in output.outputs:
                    state = states[p, o.index]
                    if state.finished:
                        continue
                    text, logprobs, finish_reason = state.update(o)
                    if text or (logprobs is not None and logprobs.tokens) or finish_reason is not None:
                        yield chunk([CompletionChoice(index=state.index, text=text, logprobs=logprobs, finish_reason=finish_reason)])
        if include_usage:
            yield chunk([], generation.usage())
