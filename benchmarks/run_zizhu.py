"""Worker: zizhu through its public offline API, run with the Python zizhu is installed in.

`LLM(path, dtype=..., max_model_len=..., max_num_seqs=64, kv_cache_memory=...[, quantization])`,
then `generate(list of token-id prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))`.
N concurrent sequences are N prompts in one generate call. The int8 variant asks for weight-only
int8 with `quantization="int8"` and is reported "not supported" when the engine refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.model_math import MLAShape, kv_bytes_latent
from benchmarks.runner import run_cases, worker_args
from benchmarks.workload import EngineResult, emit

# variant -> (dtype, quantization)
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8")}


def main() -> None:
    args = worker_args(__doc__, list(VARIANTS))
    if args.prepare_only:
        return
    import time

    import torch

    import zizhu
    from zizhu import LLM, SamplingParams

    wl = args.workload
    torch.set_num_threads(wl.threads)
    dtype, quantization = VARIANTS[args.variant]
    result = EngineResult(engine="zizhu", variant=args.variant,
                          version=f"zizhu {zizhu.__version__}, torch {torch.__version__}")
    shape = MLAShape.from_config(json.loads((Path(args.checkpoint) / "config.json").read_text()))
    # an int8 model caches bf16 latents (the engine's default for it), a bf16 one bf16, fp32 fp32
    kv_budget = wl.kv_budget_bytes(kv_bytes_latent(shape, 2 if dtype == "bfloat16" or quantization else 4))
    result.extra["kv_cache_memory"] = kv_budget
    options = dict(dtype=dtype, max_model_len=wl.max_model_len, max_num_seqs=max(wl.concurrency),
                   kv_cache_memory=kv_budget)
    if quantization:
        options["quantization"] = quantization
    start = time.perf_counter()
    try:
        llm = LLM(args.checkpoint, **options)
    except (TypeError, ValueError, NotImplementedError) as exc:
        if quantization and "quantiz" in str(exc).lower():
            result.status = "not supported"
            result.notes.append(f"quantization={quantization!r} refused: {exc}")
            emit(result)
            return
        raise
    result.load_s = time.perf_counter() - start
    kv = getattr(llm.engine, "kv_bytes_per_token", None)
    if kv is not None:
        result.kv_bytes_per_token = float(kv)
        result.kv_source = "reported by the engine (LLMEngine.kv_bytes_per_token)"

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return [len(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    emit(run_cases(generate, wl, result))


if __name__ == "__main__":
    main()
