"""FP8 e4m3 block-quantized checkpoints (DeepSeek-V3's shipping format) load and match the dequantized model."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.checkpoints import ENGINE_CONFIGS, hf_greedy
from zizhu import LLM, SamplingParams

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
NOT_QUANTIZED = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "layernorm")


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc)
    padded[:rows, :cols] = w
    tiles = padded.view(nr, br, nc, bc)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [nr, nc]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nr * br, nc * bc)[:rows, :cols]
    return q.contiguous(), scale.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: q.shape[0], : q.shape[1]]
    return q.float() * expanded


def write_fp8_checkpoint(hf_model, out, block):
    """Quantize every linear weight but the embedding, head and router; write two shards and an index."""
    hf_model.save_pretrained(out)  # config.json and the weight names HF writes
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    (out / "model.safetensors").unlink()
    tensors, reference = {}, {}
    for name, tensor in saved.items():
        if tensor.dim() == 2 and name.endswith(".weight") and not any(tag in name for tag in NOT_QUANTIZED):
            q, scale = quantize_blocks(tensor.float(), block)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            reference[name] = dequantize(q, scale, block)
        else:
            tensors[name] = tensor
            reference[name] = tensor
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / shard))
        weight_map.update({k: shard for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    cfg.update({k: getattr(hf_model.config, k) for k in ("topk_method", "scoring_func") if hasattr(hf_model.config, k)})
    (out / "config.json").write_text(json.dumps(cfg))
    return reference


@pytest.mark.parametrize("name,block", [(n, (128, 128)) for n in ENGINE_CONFIGS] + [("tiny_deepseek_v3", (16, 32))])
def test_fp8_checkpoint_matches_dequantized_reference(tiny_checkpoints, tmp_path, name, block):
    from transformers import AutoModelForCausalLM

    _, hf = tiny_checkpoints[name]
    out = tmp_path / "fp8"
    reference = write_fp8_checkpoint(hf, out, block)
    # The oracle: HF loading a bf16-style checkpoint holding exactly the dequantized weights.
    ref_dir = tmp_path / "dequantized"
    ref_dir.mkdir()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    oracle = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    assert any(v.dtype == torch.float8_e4m3fn for v in _load_all(out).values())

    llm = LLM(out, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    prompt = torch.randint(2, hf.config.vocab_size, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    out_tokens = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0))[0].outputs[0]
    assert out_tokens.token_ids == hf_greedy(oracle, prompt, 16)
    with torch.no_grad():
        ref_lp = torch.log_softmax(oracle(torch.tensor([prompt + out_tokens.token_ids])).logits[0], dim=-1)
    for step, (token, entry) in enumerate(zip(out_tokens.token_ids, out_tokens.logprobs)):
        assert abs(entry[token].logprob - ref_lp[len(prompt) - 1 + step, token].item()) < 1e-4
    # and the quantization really changed the weights, so this is not a bf16 test in disguise
    with torch.no_grad():
        assert not torch.allclose(oracle(torch.tensor([prompt])).logits, hf(torch.tensor([prompt])).logits, atol=1e-4)


def _load_all(path):
    from safetensors import safe_open

    tensors = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors
