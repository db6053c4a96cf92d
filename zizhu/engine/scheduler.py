"""Who runs this step: continuous batching under a token budget.

Every step, running sequences go first (a decode costs one token, an unfinished prefill takes a
chunk of what budget is left), then waiting ones are admitted while budget, sequence slots and KV
blocks last. When blocks run out, the most recently admitted sequence is preempted: its blocks are
freed and it recomputes later, usually mostly from the prefix cache.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from zizhu.engine.kv_cache import BlockManager
from zizhu.engine.request import Request, Status

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    requests: list[Request]  # decodes (one new token) first, then prefills
    num_new_tokens: list[int]
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        chosen: dict[int, tuple[Request, int]] = {}
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_pending_tokens, budget)
            while not self.blocks.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                if (undone := chosen.pop(id(victim), None)) is not None:
                    budget += undone[1]
                preempted = True
                if victim is request:
                    break
            else:
                chosen[id(request)] = (request, num_new)
                budget -= num_new
                index += 1

        # Admit new work only when nothing was preempted: otherwise the victim would just bounce.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            self.blocks.match_prefix(request)
            num_new = min(request.num_pending_tokens, budget)
            if not self.blocks.allocate(request, num_new):
                self.blocks.free_request(request)  # give back any prefix blocks it took
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            chosen[id(request)] = (request, num_new)
            budget -= num_new

        if not chosen:
            if self.waiting and not self.running:
                # Should be impossible: the engine sizes the cache to hold one max-length sequence.
                raise RuntimeError("the KV cache cannot hold the next waiting request")
            return None
        items = list(chosen.values())
        items.sort(key=lambda item: item[1] != 1)  # one-token steps run on the batched decode path
        num_decodes = sum(1 for _, n in items if n == 1)
        return ScheduledBatch([r for r, _ in items], [n for _, n in items], num_decodes)

    def _preempt(self, request: Request) -> None:
        self.blocks.free_request(request)
        request.status = Status.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s (recompute %d tokens)", request.request_id, request.num_tokens)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request from the queues and release its blocks."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free_request(request)
        request.status = Status.FINISHED
