"""One sequence's state as it moves through waiting -> running -> finished (and back on preemption)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from zizhu.outputs import PositionLogprobs
from zizhu.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A single generated sequence. A user request with n > 1 becomes n of these sharing `parent_id`."""

    request_id: str
    parent_id: str
    index: int  # position among the parent's n sequences
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[PositionLogprobs] | None = None
    generator: torch.Generator | None = None  # per-request RNG, so seeded sampling ignores batch mates
    num_preemptions: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
