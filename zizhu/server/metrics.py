"""Prometheus metrics for one server app.

Each app owns its CollectorRegistry, so several apps (tests, or several engines in one process) do not
collide in the global registry. Engine gauges (running/waiting sequences, KV-cache blocks) are read
from `engine.stats()` at scrape time rather than pushed on every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineStatsCollector:
    def __init__(self, stats: Callable[[], object]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        total = stats.num_blocks_total
        gauges = [
            ("zizhu_num_requests_running", "Sequences currently being decoded.", stats.num_running),
            ("zizhu_num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting),
            ("zizhu_kv_cache_blocks_total", "KV-cache blocks in the pool.", total),
            ("zizhu_kv_cache_blocks_used", "KV-cache blocks holding live sequences.", stats.num_blocks_used),
            ("zizhu_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", stats.num_blocks_used / total if total else 0.0),
            ("zizhu_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache so far.", stats.prefix_cache_hit_tokens),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], object]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zizhu_requests",
            "Finished generation requests, by endpoint and finish reason.",
            ["endpoint", "finish_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "zizhu_request_errors", "Requests answered with an error, by HTTP status.", ["status"], registry=self.registry
        )
        self.prompt_tokens = Counter("zizhu_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter("zizhu_generation_tokens", "Tokens generated.", registry=self.registry)
        self.time_to_first_token = Histogram(
            "zizhu_time_to_first_token_seconds",
            "From request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "zizhu_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "zizhu_e2e_request_latency_seconds",
            "From request arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)


class RequestTracker:
    """Timing of one request; feed it the number of new tokens at each engine output."""

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self._metrics = metrics
        self._endpoint = endpoint
        self._start = time.perf_counter()
        self._last_token_time: float | None = None
        self._done = False

    def on_tokens(self, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        if self._last_token_time is None:
            self._metrics.time_to_first_token.observe(now - self._start)
            new_tokens -= 1
        if new_tokens > 0:
            gap = (now - (self._last_token_time or now)) / new_tokens
            for _ in range(new_tokens):
                self._metrics.inter_token_latency.observe(gap)
        self._last_token_time = now

    def on_finish(self, prompt_tokens: int, completion_tokens: int, finish_reasons: list[str | None]) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.generation_tokens.inc(completion_tokens)
        self._metrics.request_latency.observe(time.perf_counter() - self._start)
        for reason in finish_reasons:
            self._metrics.requests.labels(self._endpoint, reason or "abort").inc()
