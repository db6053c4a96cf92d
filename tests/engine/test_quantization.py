"""Weight-only int8 stays close to the unquantized model."""

import pytest
import torch

from zizhu import LLM, SamplingParams
from zizhu.errors import ConfigError
from zizhu.layers.quant import quantize_int8_rows


def test_int8_rows_round_trip():
    w = torch.randn(64, 96) * 0.05
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int8_model_stays_close(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    full = LLM(path, dtype="float32", kv_cache_memory=1 << 20)
    quant = LLM(path, dtype="float32", kv_cache_memory=1 << 20, quantization="int8")
    assert any(b.dtype == torch.int8 for b in quant.engine.model.buffers())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (5, 11, 17, 23)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    a = full.generate(prompts, params)
    b = quant.generate(prompts, params)
    agree = sum(x == y for o1, o2 in zip(a, b) for x, y in zip(o1.outputs[0].token_ids, o2.outputs[0].token_ids))
    assert agree / (16 * len(prompts)) >= 0.9
    # the first generated token's logprob moves only a little
    for o1, o2 in zip(a, b):
        t = o1.outputs[0].token_ids[0]
        if o2.outputs[0].token_ids[0] == t:
            assert abs(o1.outputs[0].logprobs[0][t].logprob - o2.outputs[0].logprobs[0][t].logprob) < 0.05


def test_unknown_quantization(tiny_checkpoints):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    with pytest.raises(ConfigError, match="quantization"):
        LLM(path, kv_cache_memory=1 << 20, quantization="int3")
