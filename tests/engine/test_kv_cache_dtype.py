"""kv_cache_dtype: the latent cache in another dtype than the model's."""

import pytest
import torch

from tests.checkpoints import bf16_copy, prefill_logits
from zizhu import LLM, SamplingParams
from zizhu.errors import ConfigError
from zizhu.platforms import get_platform

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)


def _prompts(n: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 256, (length,), generator=g).tolist() for length in (5, 11, 17, 23)[:n]]


def test_bf16_model_with_an_fp32_cache_is_the_fp32_model(tiny_checkpoints, tmp_path):
    """bf16 weights hold their values exactly in fp32; with fp32 activations (the CPU's choice) and
    an fp32 cache nothing is rounded, so the bf16 model generates what the fp32 model does, and its
    cache takes twice the bytes of a bf16 one."""
    if get_platform().name != "cpu":
        pytest.skip("exactness rests on the CPU's fp32 activations for bf16 weights")
    path = bf16_copy(tiny_checkpoints["tiny_deepseek_v3"][0], tmp_path / "bf16")
    fp32 = LLM(path, dtype="float32", kv_cache_memory=1 << 20)
    wide = LLM(path, dtype="bfloat16", kv_cache_dtype="float32", kv_cache_memory=1 << 20)
    narrow = LLM(path, dtype="bfloat16", kv_cache_memory=1 << 20)
    assert wide.engine.kv_bytes_per_token == 2 * narrow.engine.kv_bytes_per_token == fp32.engine.kv_bytes_per_token
    assert all(c.dtype == torch.float32 for c in wide.engine.runner.kv_caches)
    reference, ours = fp32.generate(_prompts(), GREEDY), wide.generate(_prompts(), GREEDY)
    for a, b in zip(reference, ours):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b, token in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert step_a[token].logprob == pytest.approx(step_b[token].logprob, abs=1e-5)


def test_int8_model_caches_bf16(tiny_checkpoints):
    """An int8 model caches bf16 latents by default: half the bytes of its fp32 activations. Its
    decode reads back what its prefill wrote (each greedy token is the forced argmax there), and the
    first token's logprob, from the prefill, moves only by the latent's bf16 rounding."""
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    full = LLM(path, dtype="float32", quantization="int8", kv_cache_dtype="float32", kv_cache_memory=1 << 20)
    half = LLM(path, dtype="float32", quantization="int8", kv_cache_memory=1 << 20)
    assert half.engine.kv_dtype == torch.bfloat16 and full.engine.kv_dtype == torch.float32
    assert 2 * half.engine.kv_bytes_per_token == full.engine.kv_bytes_per_token
    prompts = _prompts()
    a, b = full.generate(prompts, GREEDY), half.generate(prompts, GREEDY)
    for prompt, o1, o2 in zip(prompts, a, b):
        tokens = o2.outputs[0].token_ids
        # what its decode steps must have picked, if they read the cache as its prefill wrote it
        assert prefill_logits(half.engine, prompt + tokens[:-1]).argmax(-1)[len(prompt) - 1:].tolist() == tokens
        first = o1.outputs[0].token_ids[0]
        if tokens[0] == first:
            assert abs(o1.outputs[0].logprobs[0][first].logprob - o2.outputs[0].logprobs[0][first].logprob) < 0.05
    assert half.engine.stats().num_blocks_used == 0


def test_unknown_kv_cache_dtype(tiny_checkpoints):
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(tiny_checkpoints["tiny_deepseek_v3"][0], kv_cache_dtype="int4", kv_cache_memory=1 << 20)
