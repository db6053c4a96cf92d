"""Worker: HF transformers `generate`, run with .venvs/hf/bin/python.

Greedy, `min_new_tokens = max_new_tokens` so EOS cannot end a sequence early (ignore_eos), equal
prompt lengths so batches need no padding, default attention (sdpa) and DynamicCache.
"""

from __future__ import annotations

from benchmarks.runner import run_cases, worker_args
from benchmarks.workload import EngineResult, emit

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def cache_bytes_per_token(model, torch) -> tuple[float, str]:
    """Bytes the DynamicCache holds per token, measured after a 16-token forward."""
    tokens = 16
    ids = torch.randint(1000, 100000, (1, tokens))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total / tokens, "measured: DynamicCache tensors after a 16-token forward"


def main() -> None:
    args = worker_args(__doc__, list(DTYPES))
    if args.prepare_only:
        return
    import time

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.workload.threads)
    result = EngineResult(engine="hf", variant=args.variant,
                          version=f"transformers {transformers.__version__}, torch {torch.__version__}")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, DTYPES[args.variant]))
    model.eval()
    result.load_s = time.perf_counter() - start
    result.kv_bytes_per_token, result.kv_source = cache_bytes_per_token(model, torch)

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=model.config.eos_token_id)
        return [out.shape[1] - ids.shape[1]] * len(prompts)

    emit(run_cases(generate, args.workload, result))


if __name__ == "__main__":
    main()
