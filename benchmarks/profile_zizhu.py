"""Where zizhu's batch-1 decode time goes: torch.profiler over one generate call.

    python -m benchmarks.profile_zizhu --model small [--tokens 32] [--batch 1] [--dtype float32]

Prints the wall time per decoded token, the share of it spent inside torch operators (the rest is
Python: scheduling, sampling bookkeeping, module calls), and the operators that take the most
self time. For Python-level hot spots, run py-spy from the hf virtualenv on the same command:

    .venvs/hf/bin/py-spy record --format speedscope -o decode.json -- python -m benchmarks.profile_zizhu --no-profiler
"""

from __future__ import annotations

import argparse
import time

from benchmarks import checkpoints
from benchmarks.workload import Prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(checkpoints.SPECS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--no-profiler", action="store_true", help="only time it (for py-spy)")
    args = parser.parse_args(argv)

    import torch

    from zizhu import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    ckpt = checkpoints.build(args.model)
    max_len = args.prompt + args.tokens + 8
    kv_bytes = 2 * 4 * max_len * args.batch * (2**20 // 16)  # generous: 128 KiB per token, x2 for blocks
    llm = LLM(ckpt, dtype=args.dtype, quantization=args.quantization, max_model_len=max_len, max_num_seqs=args.batch, kv_cache_memory=kv_bytes)
    prompts = Prompts(7)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts.make(args.batch, 16), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    start = time.perf_counter()
    llm.generate(prompts.make(args.batch, args.prompt), first)
    prefill_s = time.perf_counter() - start
    batch = prompts.make(args.batch, args.prompt)
    if args.no_profiler:
        start = time.perf_counter()
        llm.generate(batch, params)
        wall = time.perf_counter() - start
        print(f"{(wall - prefill_s) / (args.tokens - 1) * 1e3:.1f} ms per decode step")
        return

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(batch, params)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    op_us = sum(e.self_cpu_time_total for e in events)
    steps = args.tokens - 1
    decode_s = wall - prefill_s
    decode = (f"decode {decode_s / steps * 1e3:.1f} ms/step, {args.batch * steps / decode_s:.1f} tok/s"
              if steps > 0 else "prefill only")
    print(f"{args.model} {args.dtype} batch {args.batch}: wall {wall:.2f} s for {args.tokens} tokens "
          f"(prefill ~{prefill_s:.2f} s); {decode}")
    print(f"time inside torch operators: {op_us / 1e6:.2f} s = {100 * op_us / 1e6 / wall:.0f}% of wall "
          f"(the rest is Python and profiler overhead)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
