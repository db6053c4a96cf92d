"""Build tiny DeepSeek checkpoints with HF transformers, the reference the engine is tested against."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPEC_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "configs"
LOCAL_CONFIGS = Path(__file__).resolve().parent / "configs"
ENGINE_CONFIGS = ["tiny_deepseek_v2", "tiny_deepseek_v2_lite", "tiny_deepseek_v3", "tiny_deepseek_v3_noqlora"]


def load_config_dict(name: str) -> dict:
    """A tiny config from the shared spec, or the copy kept with the tests when that is absent."""
    for folder in (SPEC_CONFIGS, LOCAL_CONFIGS):
        path = folder / f"{name}.json"
        if path.is_file():
            return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    raise FileNotFoundError(f"tiny config {name} not found in {SPEC_CONFIGS} or {LOCAL_CONFIGS}")


def build_hf_model(name: str, seed: int = 0, init_std: float = 0.1, **overrides):
    """A random HF model with every branch exercised.

    Weights use a wide init (so logits spread out and greedy decoding has no near-ties) and the
    router bias buffers are randomized (zero bias would hide noaux_tc selection bugs).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = load_config_dict(name)
    raw["initializer_range"] = init_std
    raw.update(overrides)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, buffer in model.named_buffers():
            if "e_score_correction_bias" in param_name:
                buffer.copy_(torch.rand_like(buffer) * 0.3)
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight") or "layernorm" in param_name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
        model.lm_head.weight.mul_(4.0)
    return model


def save_checkpoint(model, out: Path, extra_config: dict | None = None) -> Path:
    """save_pretrained, then restore the routing keys that HF's config drops (as real checkpoints have them)."""
    model.save_pretrained(out)
    raw_keys = {k: getattr(model.config, k) for k in ("topk_method", "scoring_func") if hasattr(model.config, k)}
    config_file = out / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg.update(raw_keys)
    cfg.update(extra_config or {})
    config_file.write_text(json.dumps(cfg, indent=2))
    return out


def bf16_copy(src: Path, dst: Path) -> Path:
    """The checkpoint at `src` with its weights rounded to bf16, saved as a bf16 checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(dst / "model.safetensors")).items()}
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def prefill_hidden(engine, ids: list[int]) -> torch.Tensor:
    """`engine`'s model's final hidden states after each token of `ids`, from one prefill into a
    fresh cache of the engine's own KV dtype (not the engine's cache: no request, no block is touched)."""
    from zizhu.layers.batch import AttentionBatch

    model, cfg, n = engine.model, engine.model_config, len(ids)
    blocks = -(-n // 16)
    caches = engine.platform.allocate_kv_cache(cfg.num_hidden_layers, blocks, 16, cfg.kv_latent_dim, engine.kv_dtype)
    batch = AttentionBatch(torch.arange(n), torch.arange(blocks)[None], torch.tensor([n]), [0, n], [n], num_decodes=0)
    with torch.no_grad():
        return model(torch.as_tensor(ids), torch.arange(n), batch, caches)


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return engine.model.compute_logits(prefill_hidden(engine, ids))


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with DeepSeek's special tokens that fits `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "DeepSeek 深度求索 latent attention", "1234 + 5678 = 6912"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
        "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "add_bos_token": True, "chat_template": template},
            ensure_ascii=False,
        )
    )


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation recomputed from scratch each step: the plainest possible oracle."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]
