"""Run the workload's cases against any engine that can generate from token ids.

Standard library only. A worker supplies `generate(prompts, max_tokens) -> list[int]`, the number
of tokens produced for each prompt, greedy and ignoring EOS; this module times the cases of
benchmarks.workload and fills an EngineResult.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Callable

from benchmarks.workload import EngineResult, Prompts, Workload

log = logging.getLogger(__name__)

Generate = Callable[[list[list[int]], int], list[int]]


def _timed(generate: Generate, prompts: list[list[int]], max_tokens: int, result: EngineResult) -> float:
    start = time.perf_counter()
    lengths = generate(prompts, max_tokens)
    elapsed = time.perf_counter() - start
    if any(n != max_tokens for n in lengths):
        note = f"asked {max_tokens} tokens per prompt, got {sorted(set(lengths))}"
        if note not in result.notes:
            result.notes.append(note)
    return elapsed


REPEAT_UNDER_S = 60.0  # repeat a timed case only when one run takes less than this


def _repeats(workload: Workload, first_run_s: float) -> int:
    return workload.repeats if first_run_s < REPEAT_UNDER_S else 1


def run_cases(generate: Generate, workload: Workload, result: EngineResult) -> EngineResult:
    """Time prefill, batch-1 decode and each concurrency level; a failing case is noted, not fatal."""
    prompts = Prompts(workload.seed)
    wl = workload
    _timed(generate, prompts.make(1, 16), 4, result)  # warm-up: first-call allocations, lazy init

    try:
        times = [_timed(generate, prompts.make(1, wl.prefill_len), 1, result)]
        while len(times) < _repeats(wl, times[0]):
            times.append(_timed(generate, prompts.make(1, wl.prefill_len), 1, result))
        best = min(times)
        result.prefill_tok_s = wl.prefill_len / best
        log.info("%s %s: prefill %.1f tok/s", result.engine, result.variant, result.prefill_tok_s)
    except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others
        result.notes.append(f"prefill failed: {exc!r}")
        log.error("prefill failed\n%s", traceback.format_exc())

    try:
        rates, full = [], 0.0
        while not rates or len(rates) < _repeats(wl, full):
            first = _timed(generate, prompts.make(1, wl.prompt_len), 1, result)
            full = _timed(generate, prompts.make(1, wl.prompt_len), wl.output_len, result)
            rates.append((wl.output_len - 1) / max(full - first, 1e-9))
        result.decode_b1_tok_s = max(rates)
        log.info("%s %s: decode b1 %.2f tok/s", result.engine, result.variant, result.decode_b1_tok_s)
    except Exception as exc:  # noqa: BLE001
        result.notes.append(f"decode_b1 failed: {exc!r}")
        log.error("decode_b1 failed\n%s", traceback.format_exc())

    # Skip a level only when even an optimistic estimate exceeds the limit: its prompts at the
    # measured prefill rate, then output_len decode steps each as fast as the last measured step
    # (a wider batch step is rarely cheaper, and on a memory-bound CPU often barely dearer).
    step_s = 1.0 / result.decode_b1_tok_s if result.decode_b1_tok_s else None
    for n in wl.concurrency:
        key = str(n)
        skip = None
        if step_s and result.prefill_tok_s:
            estimate = n * wl.prompt_len / result.prefill_tok_s + wl.output_len * step_s
            if estimate > wl.max_case_seconds:
                skip = f"skipped: estimated at least {estimate:.0f} s > {wl.max_case_seconds:.0f} s limit"
        if skip:
            result.concurrent_tok_s[key] = None
            result.notes.append(f"concurrent {n}: {skip}")
            continue
        try:
            elapsed = _timed(generate, prompts.make(n, wl.prompt_len), wl.output_len, result)
            result.concurrent_tok_s[key] = n * wl.output_len / elapsed
            if result.prefill_tok_s:
                decode_s = elapsed - n * wl.prompt_len / result.prefill_tok_s
                step_s = max(decode_s, 0.0) / wl.output_len or step_s
            log.info("%s %s: %d concurrent %.1f tok/s", result.engine, result.variant, n,
                     result.concurrent_tok_s[key])
        except Exception as exc:  # noqa: BLE001
            result.concurrent_tok_s[key] = None
            result.notes.append(f"concurrent {n} failed: {exc!r}")
            log.error("concurrent %d failed\n%s", n, traceback.format_exc())
    return result


def worker_args(description: str, variants: list[str]):
    """Command line shared by every worker: which checkpoint, which weight format, which workload."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, safetensors)")
    parser.add_argument("--variant", required=True, choices=variants)
    parser.add_argument("--workload", required=True, help="Workload as JSON (benchmarks.workload)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only prepare files the run needs (e.g. a converted checkpoint), then exit")
    args = parser.parse_args()
    args.workload = Workload.from_json(args.workload)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args
