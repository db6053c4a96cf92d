"""Worker: vLLM's CPU build, offline `LLM.generate` on token ids, run with .venvs/vllm/bin/python.

The orchestrator sets the environment shared/peers.md found best on 2 cores (threads bound to
both cores, none reserved, tcmalloc + iomp5 preloaded, VLLM_CPU_KVCACHE_SPACE) and
VLLM_MLA_DISABLE=1 unless the latent is the 576 wide one its CPU MLA kernel accepts.
Prefix caching keeps its default; the workload never repeats a prompt.
"""

from __future__ import annotations

import os

from benchmarks.runner import run_cases, worker_args
from benchmarks.workload import EngineResult, emit

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def main() -> None:
    args = worker_args(__doc__, list(DTYPES))
    if args.prepare_only:
        return
    import time
    from importlib.metadata import version

    from vllm import LLM, SamplingParams

    wl = args.workload
    result = EngineResult(engine="vllm", variant=args.variant, version=f"vllm-cpu {version('vllm-cpu')}")
    result.extra["VLLM_MLA_DISABLE"] = os.environ.get("VLLM_MLA_DISABLE", "0")
    start = time.perf_counter()
    llm = LLM(model=args.checkpoint, dtype=DTYPES[args.variant], max_model_len=wl.max_model_len,
              max_num_seqs=max(wl.concurrency), skip_tokenizer_init=True,
              seed=0)
    result.load_s = time.perf_counter() - start

    cache = llm.llm_engine.vllm_config.cache_config
    space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")) * 2**30
    if cache.num_gpu_blocks and space:
        tokens = cache.num_gpu_blocks * cache.block_size
        result.kv_bytes_per_token = space / tokens
        result.kv_source = f"measured: VLLM_CPU_KVCACHE_SPACE / {tokens} cache tokens"

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    emit(run_cases(generate, wl, result))


if __name__ == "__main__":
    main()
