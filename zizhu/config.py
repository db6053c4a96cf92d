"""Typed configuration: ModelConfig is parsed once from config.json, EngineConfig holds serving limits.

Every default that a checkpoint may omit lives here and nowhere else, so the model code can read
fields without guessing. Defaults follow the HF reference modeling code, which is what released
checkpoints are validated against.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zizhu.errors import ConfigError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_scaling` or `rope_parameters`."""

    theta: float = 10000.0
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    interleaved: bool = True  # DeepSeek pairs rotary dims as (2i, 2i+1)

    @property
    def softmax_mscale(self) -> float:
        """Extra factor on the softmax scale (squared by the caller), as DeepSeek's YaRN defines it."""
        if self.type == "default" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class QuantizationConfig:
    method: str  # "fp8"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    first_k_dense_replace: int = 0
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    torch_dtype: str | None = None
    quantization: QuantizationConfig | None = None
    attention_bias: bool = False
    # Sampling the checkpoint asks for when a request leaves it unset (generation_config.json).
    generation_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_latent_dim(self) -> int:
        """Width of one cached row per layer and token: normalised c_kv plus the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale**2

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.n_routed_experts) and layer >= self.first_k_dense_replace

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.kv_latent_dim * self.num_hidden_layers * dtype_bytes

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{config_file} not found: a model directory needs config.json")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file} is not valid JSON: {e}") from e
        gen_file = Path(path) / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(raw, generation_config=gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "kv_lora_rank"):
            if raw.get(key) is None:
                hint = ": is this a DeepSeek-V2+ checkpoint?" if key == "kv_lora_rank" else ""
                raise ConfigError(f"{key} missing from config.json{hint}")
        is_v3 = model_type == "deepseek_v3"
        moe_fields = _moe_fields(raw, is_v3)
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw.get("intermediate_size", 4 * raw["hidden_size"]),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            kv_lora_rank=raw["kv_lora_rank"],
            qk_nope_head_dim=raw.get("qk_nope_head_dim", 128),
            qk_rope_head_dim=raw.get("qk_rope_head_dim", 64),
            v_head_dim=raw.get("v_head_dim", 128),
            q_lora_rank=raw.get("q_lora_rank"),
            rope=_rope_config(raw, is_v3),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw, generation_config or {}),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0) or 0,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            quantization=_quantization(raw.get("quantization_config")),
            attention_bias=bool(raw.get("attention_bias", False)),
            generation_defaults=_generation_defaults(generation_config or {}),
            **moe_fields,
        )


def _generation_defaults(gen: dict[str, Any]) -> dict[str, float]:
    """temperature / top_p / top_k from generation_config.json; `do_sample: false` means greedy, as in
    transformers. Only what the file states: an empty dict leaves the caller's own defaults."""
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    defaults = {}
    for key in ("temperature", "top_p"):
        if isinstance(gen.get(key), (int, float)):
            defaults[key] = float(gen[key])
    if isinstance(gen.get("top_k"), int):
        defaults["top_k"] = gen["top_k"]
    return defaults


def _moe_fields(raw: dict[str, Any], is_v3: bool) -> dict[str, Any]:
    n_routed = raw.get("n_routed_experts")
    fields: dict[str, Any] = dict(
        moe_intermediate_size=raw.get("moe_intermediate_size", 0),
        n_routed_experts=n_routed,
        n_shared_experts=raw.get("n_shared_experts") or 0,
        num_experts_per_tok=raw.get("num_experts_per_tok") or 1,
        first_k_dense_replace=raw.get("first_k_dense_replace", 0),
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
    )
    if is_v3:
        # Saved HF configs drop these keys; V3-class checkpoints route with sigmoid + noaux_tc.
        fields.update(
            topk_method=raw.get("topk_method") or "noaux_tc",
            scoring_func=raw.get("scoring_func") or "sigmoid",
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        )
    else:
        # V2 routes with softmax and never renormalises (every V2 release sets norm_topk_prob false).
        fields.update(topk_method=raw.get("topk_method") or "greedy", scoring_func="softmax", norm_topk_prob=False)
    if fields["topk_method"] not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"unknown topk_method {fields['topk_method']!r} in config.json")
    if fields["scoring_func"] not in ("softmax", "sigmoid"):
        raise ConfigError(f"unknown scoring_func {fields['scoring_func']!r} in config.json")
    if n_routed:
        if n_routed % fields["n_group"]:
            raise ConfigError(f"n_routed_experts {n_routed} is not divisible by n_group {fields['n_group']}")
        if not fields["moe_intermediate_size"]:
            raise ConfigError("moe_intermediate_size missing from config.json of a MoE model")
    return fields


def _rope_config(raw: dict[str, Any], is_v3: bool) -> RopeConfig:
    params = dict(raw.get("rope_scaling") or {})
    nested = raw.get("rope_parameters")
    if isinstance(nested, dict):
        params = {**nested, **params}
    theta = params.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    interleaved = bool(raw.get("rope_interleave", True)) if is_v3 else True
    if rope_type == "default":
        return RopeConfig(theta=float(theta), interleaved=interleaved)
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (expected 'yarn' or none)")
    orig = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        if not orig:
            raise ConfigError("YaRN rope_scaling needs factor or original_max_position_embeddings")
        factor = raw.get("max_position_embeddings", 4096) / orig
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=orig or raw.get("max_position_embeddings", 4096),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleaved=interleaved,
    )


def _eos_ids(raw: dict[str, Any], gen: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (gen.get("eos_token_id"), raw.get("eos_token_id")):
        if source is None:
            continue
        for token in source if isinstance(source, list) else [source]:
            if token not in ids:
                ids.append(int(token))
    return tuple(ids)


def _quantization(q: dict[str, Any] | None) -> QuantizationConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization method {method!r} is not supported (supported: fp8 block-quantized)")
    block = q.get("weight_block_size") or [128, 128]
    return QuantizationConfig(method="fp8", weight_block_size=(int(block[0]), int(block[1])))


@dataclass
class EngineConfig:
    """Serving limits. None means "derive from the model and the platform" at engine start."""

    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | None = None  # bytes, or a fraction (0, 1] of available memory
    enable_prefix_caching: bool = True
    max_waiting: int | None = None
    quantization: str | None = None  # "int8": weight-only int8 of linear and expert weights, at load
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; or float32, bfloat16, float16

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if isinstance(self.kv_cache_memory, float) and not 0 < self.kv_cache_memory <= 1:
            raise ConfigError(f"kv_cache_memory as a fraction must be in (0, 1], got {self.kv_cache_memory}")
