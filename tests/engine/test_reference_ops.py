"""Without its native kernels the CPU platform runs every hook on the reference ops in zizhu.ops, as
a new platform does before it overrides any: the whole model must still run, and agree with the
native kernels, through prefill, chunked and decode-only steps."""

import pytest
import torch

from zizhu import LLM, SamplingParams
from zizhu.platforms import cpu_kernels


def test_native_kernels_build():
    """The native kernels compile here: if they did not, the platform would quietly fall back to
    the reference ops (and every native-path test would test those instead)."""
    if cpu_kernels.load() is None:
        pytest.fail("the native CPU kernels did not build (see the zizhu.platforms.cpu_kernels log)")


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_reference_ops_run_the_model(tiny_checkpoints, monkeypatch, quantization):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (3, 9, 21, 40)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    options = dict(dtype="float32", kv_cache_memory=1 << 20, quantization=quantization, max_num_batched_tokens=24)
    native = [o.outputs[0].token_ids for o in LLM(path, **options).generate(prompts, params)]
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    reference = [o.outputs[0].token_ids for o in LLM(path, **options).generate(prompts, params)]
    if quantization is None:
        assert reference == native
    else:  # the native int8 products round activations to int16 (Platform.int8_linear)
        agree = sum(a == b for x, y in zip(native, reference) for a, b in zip(x, y))
        assert agree / (10 * len(prompts)) >= 0.9
