"""Checkpoint discovery and loading: Hugging Face cache ids, MTP layers, dtypes."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import bf16_copy, hf_greedy, prefill_hidden
from zizhu import LLM, SamplingParams
from zizhu.errors import ModelNotFoundError
from zizhu.loader.resolve import resolve_model_path


def _fake_hub_cache(cache_dir, repo_id, files_from):
    """Lay out a checkpoint the way huggingface_hub caches a download."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_local_cache_offline(tiny_checkpoints, tmp_path, monkeypatch):
    path, hf = tiny_checkpoints["tiny_deepseek_v3"]
    snapshot = _fake_hub_cache(tmp_path, "deepseek-ai/Tiny-V3", path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("deepseek-ai/Tiny-V3").resolve() == snapshot.resolve()
    llm = LLM("deepseek-ai/Tiny-V3", dtype="float32", kv_cache_memory=1 << 20)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [5, 6, 7], 4)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model_path("deepseek-ai/Not-Cached")


def test_mtp_layer_weights_load_and_are_ignored(tiny_checkpoints, tmp_path):
    src, hf = tiny_checkpoints["tiny_deepseek_v3"]
    dst = tmp_path / "with_mtp"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    n = hf.config.num_hidden_layers  # MTP modules sit at layer index num_hidden_layers
    d = hf.config.hidden_size
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        weights[f"model.layers.{n}.{name}"] = torch.ones(d)
    weights[f"model.layers.{n}.eh_proj.weight"] = torch.randn(d, 2 * d)
    weights[f"model.layers.{n}.shared_head.head.weight"] = torch.randn(hf.config.vocab_size, d)
    weights[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = torch.randn(8, 8)
    save_file(weights, str(dst / "model.safetensors"))
    llm = LLM(dst, dtype="float32", kv_cache_memory=1 << 20)
    out = llm.generate([[9, 8, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [9, 8, 7], 4)


def test_bf16_checkpoint(tiny_checkpoints, tmp_path):
    """A bf16 checkpoint computed in fp32 matches HF fed the same bf16 weights; in bf16 it mostly agrees."""
    from transformers import AutoModelForCausalLM

    src, hf = tiny_checkpoints["tiny_deepseek_v2"]
    dst = bf16_copy(src, tmp_path / "bf16")
    oracle = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    prompt = [3, 14, 15, 92, 65, 35]
    fp32 = LLM(dst, dtype="float32", kv_cache_memory=1 << 20)
    assert fp32.engine.dtype == torch.float32
    ours = fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    assert ours == hf_greedy(oracle, prompt, 12)
    bf16 = LLM(dst, dtype="bfloat16", kv_cache_memory=1 << 20)
    low = bf16.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    assert sum(a == b for a, b in zip(low, ours)) >= 6


@pytest.mark.parametrize("name", ["tiny_deepseek_v3", "tiny_deepseek_v2_lite"])
def test_bf16_model_keeps_fp32_activations_on_cpu(tiny_checkpoints, tmp_path, name):
    """The CPU computes a bf16 model's activations in fp32 (CpuPlatform.activation_dtype): its prefill
    logits then differ from the fp32 model's on the same bf16 weights only by the bf16 KV cache.
    Rounding the activations to bf16 between operators, as before, put them 3-4x further away
    (mean |difference| 0.025-0.032, max 0.20-0.54)."""
    from zizhu.platforms import get_platform

    if get_platform().name != "cpu":
        pytest.skip("the CPU platform's choice; another platform may keep bf16 activations")
    path = bf16_copy(tiny_checkpoints[name][0], tmp_path / "bf16")
    ids = torch.randint(2, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = LLM(path, dtype=dtype, kv_cache_memory=1 << 20).engine
        assert engine.model.activation_dtype == torch.float32
        assert engine.kv_dtype == getattr(torch, dtype)
        hidden = prefill_hidden(engine, ids)
        assert hidden.dtype == torch.float32
        with torch.no_grad():
            logits[dtype] = engine.model.compute_logits(hidden)
    diff = (logits["bfloat16"] - logits["float32"]).abs()
    assert logits["float32"].std() > 1.0, "logits too flat for the bounds below to mean anything"
    assert diff.mean() < 0.012 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_shared_experts_fold_into_routed_experts(tiny_checkpoints):
    """In fp32 the shared MLP becomes n_shared_experts always-chosen stacked experts (the HF-parity
    tests check the outputs); in bf16 only where the platform sums experts in fp32 (the CPU's native
    kernels do), never by the reference rule, which rounds each expert's output to bf16."""
    from zizhu.layers.moe import MoE
    from zizhu.platforms import Platform, cpu_kernels

    path, _ = tiny_checkpoints["tiny_deepseek_v2"]  # 16 routed, 2 shared experts
    assert not Platform.folds_shared_experts(None, torch.bfloat16) and Platform.folds_shared_experts(None, torch.float32)
    native = cpu_kernels.load() is not None
    for dtype, folded in (("float32", True), ("bfloat16", native)):
        model = LLM(path, dtype=dtype, kv_cache_memory=1 << 20).engine.model
        assert model.platform.folds_shared_experts(getattr(torch, dtype)) == folded
        moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
        assert moes
        for moe in moes:
            assert (moe.num_shared, moe.shared_experts is None, moe.experts.w13.shape[0]) == (
                (2, True, 18) if folded else (0, False, 16)
            )
