"""POST /v1/completions: one engine request per prompt, choices numbered prompt-major as OpenAI does."""

from __future__ import annotations

from collections.abc import AsyncIterator

from zizhu.errors import InvalidRequestError
from zizhu.outputs import CompletionOutput, RequestOutput
from zizhu.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, now, random_id
from zizhu.server.serving import ServingContext, merge_streams, new_positions, record_finish, sampling_params, usage


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
        params = sampling_params(request, request.max_tokens, request.logprobs)
        request_id = random_id("cmpl")
        tracker = self.ctx.metrics.track("completions")
        streams = await self.ctx.open_streams(
            [(f"{request_id}-{i}", ids, params, text) for i, (ids, text) in enumerate(prompts)]
        )
        states = {
            (p, i): CompletionChoiceState(p * request.n + i, self._echo(request, ids, text), request.logprobs)
            for p, (ids, text) in enumerate(prompts)
            for i in range(request.n)
        }
        meta = (request_id, now(), model)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self._stream(meta, streams, states, tracker, include_usage)
        return await self._complete(meta, streams, states, tracker)

    async def _complete(self, meta, streams, states, tracker) -> CompletionResponse:
        request_id, created, model = meta
        finals: list[RequestOutput | None] = [None] * len(streams)
        tokens_seen = [0] * len(streams)
        async for p, output in merge_streams(streams):
            total = sum(len(o.token_ids) for o in output.outputs)
            tracker.on_tokens(total - tokens_seen[p])
            tokens_seen[p], finals[p] = total, output
        record_finish(tracker, finals)
        choices = []
        for p, final in enumerate(finals):
            for o in final.outputs:
                text, logprobs, finish_reason = states[p, o.index].update(o)
                choices.append(CompletionChoice(index=states[p, o.index].index, text=text, logprobs=logprobs, finish_reason=finish_reason))
        return CompletionResponse(
            id=request_id,
            created=created,
            model=model,
            choices=sorted(choices, key=lambda c: c.index),
            usage=_usage(finals),
        )

    async def _stream(self, meta, streams, states, tracker, include_usage: bool) -> AsyncIterator[CompletionResponse]:
        request_id, created, model = meta
        finals: list[RequestOutput | None] = [None] * len(streams)
        tokens_seen = [0] * len(streams)
        try:
            async for p, output in merge_streams(streams):
                total = sum(len(o.token_ids) for o in output.outputs)
                tracker.on_tokens(total - tokens_seen[p])
                tokens_seen[p], finals[p] = total, output
                for o in output.outputs:
                    state = states[p, o.index]
                    if state.finished:
                        continue
                    text, logprobs, finish_reason = state.update(o)
                    if text or (logprobs is not None and logprobs.tokens) or finish_reason is not None:
                        choice = CompletionChoice(index=state.index, text=text, logprobs=logprobs, finish_reason=finish_reason)
                        yield CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
            if include_usage:
                yield CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=_usage(finals))
        finally:
            record_finish(tracker, finals)


def _usage(finals: list[RequestOutput | None]):
    done = [f for f in finals if f is not None]
    return usage(
        sum(len(f.prompt_token_ids) for f in done),
        sum(len(o.token_ids) for f in done for o in f.outputs),
    )
