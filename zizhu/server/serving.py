"""What the chat and completion endpoints share: the engine handle, request checks, streams, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from zizhu.errors import InvalidRequestError
from zizhu.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from zizhu.sampling_params import SamplingParams
from zizhu.server.metrics import RequestTracker, ServerMetrics
from zizhu.server.protocol import SamplingFields, Usage
from zizhu.server.reasoning import THINK_END
from zizhu.server.tool_calls import detect_tool_call_format

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with the given HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


@dataclass
class ServingConfig:
    model_names: list[str]
    tool_call_format: str | None = None  # a key of tool_calls.TOOL_CALL_FORMATS; None: no tool parsing
    reasoning: bool = True  # split <think>...</think> into reasoning_content

    @classmethod
    def for_engine(cls, engine, model_names: list[str], tool_call_parser: str = "auto", reasoning_parser: str = "auto"):
        """Resolve "auto" parsers from the checkpoint: its model_type, chat template and vocabulary."""
        if tool_call_parser == "auto":
            tool_format = detect_tool_call_format(engine.model_config.model_type, engine.tokenizer.chat_template)
        else:
            tool_format = None if tool_call_parser == "none" else tool_call_parser
        if reasoning_parser == "auto":
            reasoning = engine.tokenizer.token_to_id(THINK_END) is not None
        else:
            reasoning = reasoning_parser != "none"
        return cls(model_names=model_names, tool_call_format=tool_format, reasoning=reasoning)


class ServingContext:
    """The engine plus everything a request handler needs besides its own request."""

    def __init__(self, async_engine, config: ServingConfig, metrics: ServerMetrics):
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.config = config
        self.metrics = metrics

    @property
    def generation_defaults(self) -> dict:
        """The checkpoint's sampling defaults (generation_config.json) for fields a request leaves unset."""
        return self.engine.model_config.generation_defaults

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def served_name(self, requested: str | None) -> str:
        if requested is None:
            return self.config.model_names[0]
        if requested not in self.config.model_names:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")
        return requested

    async def start(self, endpoint: str, requests: list[tuple[str, list[int], SamplingParams, str | None]]) -> Generation:
        """Submit every prompt and wait for its first output, so that refusals (queue full, prompt too
        long) become an HTTP status before any response byte is sent."""
        tracker = self.metrics.track(endpoint)
        opened: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, token_ids, params, prompt in requests:
                stream = self.async_engine.generate(request_id, token_ids, params, prompt=prompt)
                try:
                    first = await anext(stream)
                except BaseException:
                    await stream.aclose()
                    raise
                opened.append(_prepend(first, stream))
        except BaseException:
            for stream in opened:
                await stream.aclose()
            raise
        return Generation(opened, tracker)


@dataclass
class ResponseHeader:
    """The fields every response and chunk of one request repeats."""

    id: str
    created: int
    model: str


class Generation:
    """The engine streams of one HTTP request: merged, timed for metrics, summed for usage."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]], tracker: RequestTracker):
        self._streams = streams
        self._tracker = tracker
        self.finals: list[RequestOutput | None] = [None] * len(streams)  # latest output per stream

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(stream index, cumulative output) as they come; closing this aborts unfinished requests."""
        seen = [0] * len(self._streams)
        try:
            async with contextlib.aclosing(merge_streams(self._streams)) as merged:
                async for index, output in merged:
                    total = sum(len(o.token_ids) for o in output.outputs)
                    self._tracker.on_tokens(total - seen[index])
                    seen[index], self.finals[index] = total, output
                    yield index, output
        finally:
            usage = self.usage()
            reasons = [o.finish_reason for final in self.finals if final is not None for o in final.outputs]
            self._tracker.on_finish(usage.prompt_tokens, usage.completion_tokens, reasons)

    def usage(self) -> Usage:
        done = [f for f in self.finals if f is not None]
        prompt_tokens = sum(len(f.prompt_token_ids) for f in done)
        completion_tokens = sum(len(o.token_ids) for f in done for o in f.outputs)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


async def _prepend(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        async for output in stream:
            yield output
    finally:
        await stream.aclose()


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as (stream index, output); closing this closes them all."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, done))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sampling_params(
    request: SamplingFields, max_tokens: int | None, logprobs: int | None, defaults: dict | None = None
) -> SamplingParams:
    """Map OpenAI fields to SamplingParams. Unset temperature / top_p / top_k take the checkpoint's
    generation_config (`defaults`), then OpenAI's defaults."""
    defaults = defaults or {}
    if request.logit_bias:
        raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingParams(
        n=request.n,
        temperature=defaults.get("temperature", 1.0) if request.temperature is None else request.temperature,
        top_p=defaults.get("top_p", 1.0) if request.top_p is None else request.top_p,
        top_k=defaults.get("top_k", 0) if request.top_k is None else request.top_k,
        min_p=request.min_p or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        stop=stop,
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
    )


def new_positions(output: CompletionOutput, seen: int) -> list[tuple[int, PositionLogprobs | None]]:
    """(token id, its logprobs or None) for each token generated after the first `seen`."""
    token_ids = output.token_ids[seen:]
    if output.logprobs is None:
        return [(t, None) for t in token_ids]
    return list(zip(token_ids, output.logprobs[seen : seen + len(token_ids)]))


async def sse(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them, ending in `data: [DONE]`.

    An engine failure after the response has started can no longer change the status code, so it is
    sent as one error event before [DONE].
    """
    try:
        async for event in events:
            yield f"data: {event.model_dump_json()}\n\n"
    except Exception as exc:
        logger.exception("stream failed")
        error = {"error": {"message": str(exc) or type(exc).__name__, "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
