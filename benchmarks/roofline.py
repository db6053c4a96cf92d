"""Memory bandwidth and the batch-1 decode bound it implies.

    python -m benchmarks.roofline --model small [--zizhu-tok-s 12.3 --dtype int8]

Batch-1 decode reads every active weight once per token, so its speed is bounded by
bandwidth / bytes read per token (benchmarks.model_math.decode_bytes_per_token: attention, the
dense MLP layers, the top-k routed experts and the shared expert of each MoE layer, the router,
lm_head, one embedding row, norms, and the KV cache at the workload's mean context); greedy
decoding reads a full-precision lm_head as its int8 screen, which gives a second, higher bound for
fp32 and bf16 (the benchmark decodes greedily). Bandwidth is
measured with a large torch copy (counted as read + write bytes, as STREAM does) and a read-only
reduction; the bound uses the faster of the two, since decode mostly reads.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.model_math import (
    MLAShape,
    decode_bytes_per_token,
    kv_bytes_latent,
    roofline_tokens_per_s,
)


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int = 2) -> dict:
    """Best-of-`repeats` copy and read bandwidth over `nbytes` fp32 buffers, in GB/s (1e9 B/s)."""
    import torch

    torch.set_num_threads(threads)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    copy_s = read_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - start)
    copy_gb_s, read_gb_s = 2 * nbytes / copy_s / 1e9, nbytes / read_s / 1e9
    # Decode mostly reads: the bound uses the faster of the two, so it stays an upper bound.
    return {"bytes": nbytes, "threads": threads, "copy_gb_s": copy_gb_s, "read_gb_s": read_gb_s,
            "bound_gb_s": max(copy_gb_s, read_gb_s)}


def kv_dtype_bytes(weight_dtype: str) -> float:
    # The engine's default cache: fp32 for fp32 weights; bf16 for bf16 and for int8 weight-only.
    return 4.0 if weight_dtype == "float32" else 2.0


def bounds(config: dict, bandwidth_gb_s: float, context_tokens: int) -> dict:
    """Per weight dtype: bytes read per token, its parts, and the decode bound in tokens/s."""
    shape = MLAShape.from_config(config)
    out = {}
    for variant, dtype in (("fp32", "float32"), ("bf16", "bfloat16"), ("int8", "int8")):
        kv = kv_bytes_latent(shape, kv_dtype_bytes(dtype))
        parts = decode_bytes_per_token(shape, dtype, context_tokens, kv)
        greedy = decode_bytes_per_token(shape, dtype, context_tokens, kv, screened_head=True)
        out[variant] = {
            "bytes_per_token": parts.total,
            "weight_bytes_per_token": parts.weights,
            "parts": {k: v for k, v in vars(parts).items()},
            "context_tokens": context_tokens,
            "bound_tok_s": roofline_tokens_per_s(bandwidth_gb_s * 1e9, parts),
            # greedy decoding reads a full-precision head's int8 screen instead (Platform.greedy_head)
            "greedy_bytes_per_token": greedy.total,
            "greedy_bound_tok_s": roofline_tokens_per_s(bandwidth_gb_s * 1e9, greedy),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.checkpoints import EXTRA_CONFIG, SPECS, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(SPECS))
    parser.add_argument("--context", type=int, default=192, help="mean context of a decode step (tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zizhu-tok-s", type=float, help="measured zizhu batch-1 decode tok/s")
    parser.add_argument("--dtype", default="int8", choices=["fp32", "bf16", "int8"],
                        help="weight format of --zizhu-tok-s")
    args = parser.parse_args(argv)

    config = dict(SPECS[args.model], **EXTRA_CONFIG)
    try:
        config = load_config(args.model)
    except FileNotFoundError:
        pass  # not built yet: the spec has every field the arithmetic needs
    bw = measure_bandwidth(threads=args.threads)
    print(f"bandwidth: copy {bw['copy_gb_s']:.1f} GB/s (read + write), read-only {bw['read_gb_s']:.1f} GB/s")
    for variant, b in bounds(config, bw["bound_gb_s"], args.context).items():
        line = (f"{args.model} {variant}: {b['bytes_per_token'] / 1e6:.1f} MB/token "
                f"-> bound {b['bound_tok_s']:.1f} tok/s (greedy, screened head: "
                f"{b['greedy_bytes_per_token'] / 1e6:.1f} MB/token -> {b['greedy_bound_tok_s']:.1f} tok/s)")
        if args.zizhu_tok_s and variant == args.dtype:
            line += f"; zizhu {args.zizhu_tok_s:.1f} tok/s = {100 * args.zizhu_tok_s / b['greedy_bound_tok_s']:.0f}%"
        print(line)


if __name__ == "__main__":
    main()
