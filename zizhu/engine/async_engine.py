"""Drive LLMEngine from asyncio: many concurrent callers share every engine step.

One background task owns the engine. New requests and aborts are queued and applied between
steps, on the event loop thread, so the engine itself stays single-threaded; each step runs in a
worker thread so the event loop keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from zizhu.engine.llm_engine import LLMEngine
from zizhu.errors import InvalidRequestError, QueueFullError
from zizhu.outputs import RequestOutput
from zizhu.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting if max_waiting is not None else engine.engine_config.max_waiting
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._stepping = False

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs; leaving the loop early aborts the request and frees its blocks."""
        self._ensure_loop()
        await self._wait_idle()
        # No await from here to add_request: the queue check and the add are one atomic step.
        if self.max_waiting is not None and self.engine.stats().num_waiting >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests): retry later")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self.engine.add_request(request_id, prompt_token_ids, params, prompt)  # raises on invalid input
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _wait_idle(self) -> None:
        """add_request must not race a step running in the worker thread."""
        while self._stepping:
            await asyncio.sleep(0.001)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._apply_aborts()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._stepping = True
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # an engine failure must reach callers, not kill the loop silently
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            finally:
                self._stepping = False
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            await asyncio.sleep(0)  # let consumers and new requests in between steps

    def _apply_aborts(self) -> None:
        while self._aborts:
            self.engine.abort_request(self._aborts.pop())

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self._streams.items()):
            queue.put_nowait(RuntimeError(f"engine failure: {error}"))
            self.engine.abort_request(request_id)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
