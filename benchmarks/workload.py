"""The workload every engine runs, and the result record every worker prints.

Standard library only: imported by the workers inside the peers' virtualenvs.

Cases, all greedy with ignore_eos, prompts of random token ids (a fresh set for every call, so no
engine gets a prefix-cache hit):
- `prefill`: one `prefill_len`-token prompt, 1 output token; prompt tokens/s = prefill_len / time.
- `decode_b1`: one `prompt_len`-token prompt, `output_len` tokens; decode tokens/s counts the
  tokens after the first over the time after the first token (time of a 1-token call subtracted).
- `concurrent_N`: N prompts of `prompt_len` submitted at once, `output_len` tokens each; aggregate
  output tokens/s = N * output_len / wall time of the whole call, prefill included.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field

TOKEN_ID_RANGE = (1000, 100000)  # clear of the special tokens at both ends of the vocabulary


@dataclass(frozen=True)
class Workload:
    prefill_len: int = 512
    prompt_len: int = 128
    output_len: int = 128
    concurrency: tuple[int, ...] = (8, 32, 64)
    repeats: int = 2  # timed repetitions of prefill and decode_b1 (the best is kept)
    threads: int = 2
    seed: int = 1234
    max_case_seconds: float = 600.0  # a case predicted to run longer is skipped, and says so

    @classmethod
    def full(cls) -> "Workload":
        return cls()

    @classmethod
    def quick(cls) -> "Workload":
        return cls(output_len=32, repeats=1, max_case_seconds=300.0)

    @property
    def max_model_len(self) -> int:
        return max(self.prefill_len + 8, self.prompt_len + self.output_len + 8)

    def kv_budget_bytes(self, kv_bytes_per_token: float) -> int:
        """KV memory for the largest case (every sequence at full length), plus 25% for block rounding.

        Engines that preallocate their cache get this much, sized in their own cache format, so
        peak RSS compares what each format needs rather than an arbitrary reservation.
        """
        tokens = max(max(self.concurrency) * (self.prompt_len + self.output_len), self.max_model_len)
        return int(1.25 * tokens * kv_bytes_per_token)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        d = json.loads(text)
        d["concurrency"] = tuple(d["concurrency"])
        return cls(**d)


class Prompts:
    """Deterministic random prompts; each call returns ids never handed out before in this run."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def make(self, n: int, length: int) -> list[list[int]]:
        lo, hi = TOKEN_ID_RANGE
        return [[self._rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


@dataclass
class EngineResult:
    """One engine variant's figures; None where a case did not run (see `notes`)."""

    engine: str  # "zizhu", "hf", "llamacpp", "vllm"
    variant: str  # weight format: "fp32", "bf16", "int8", "f16", "q8_0"
    status: str = "ok"  # "ok" | "not installed" | "not supported" | "failed"
    prefill_tok_s: float | None = None
    decode_b1_tok_s: float | None = None
    concurrent_tok_s: dict[str, float | None] = field(default_factory=dict)  # str(N) -> output tok/s
    peak_rss_bytes: int | None = None
    kv_bytes_per_token: float | None = None
    kv_source: str = ""  # how kv_bytes_per_token was obtained
    load_s: float | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineResult":
        return cls(**d)


RESULT_PREFIX = "BENCH_RESULT "


def emit(result: EngineResult) -> None:
    """Print the one result line the orchestrator reads back from a worker's stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> EngineResult | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return EngineResult.from_dict(json.loads(line[len(RESULT_PREFIX):]))
    return None
