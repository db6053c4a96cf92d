"""Sizes derived from a DeepSeek config.json: parameters, bytes read per decoded token, KV bytes.

Standard library only (imported by workers in the peers' virtualenvs). All counts follow the
spec (shared/spec/deepseek.md, sections 1 and 4); field names are config.json's.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per weight element for the weight formats the benchmark compares.
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0}
# Weight-only int8 keeps one fp32 scale per output row of every quantized matrix.
INT8_SCALE_BYTES_PER_ROW = 4


@dataclass(frozen=True)
class MLAShape:
    hidden: int
    layers: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab: int
    intermediate: int
    moe_intermediate: int
    n_routed_experts: int
    n_shared_experts: int
    experts_per_token: int
    first_k_dense_replace: int

    @classmethod
    def from_config(cls, cfg: dict) -> "MLAShape":
        return cls(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            vocab=cfg["vocab_size"],
            intermediate=cfg["intermediate_size"],
            moe_intermediate=cfg["moe_intermediate_size"],
            n_routed_experts=cfg["n_routed_experts"],
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            experts_per_token=cfg["num_experts_per_tok"],
            first_k_dense_replace=cfg.get("first_k_dense_replace", 0),
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_k_dense_replace

    # Each entry: (rows, cols) of one Linear weight, [out_features, in_features].
    def attention_matrices(self) -> list[tuple[int, int]]:
        d, h = self.hidden, self.heads
        mats = []
        if self.q_lora_rank:
            mats += [(self.q_lora_rank, d), (h * self.qk_head_dim, self.q_lora_rank)]
        else:
            mats += [(h * self.qk_head_dim, d)]
        mats += [
            (self.kv_lora_rank + self.qk_rope_head_dim, d),  # kv_a_proj_with_mqa
            (h * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),  # kv_b_proj
            (d, h * self.v_head_dim),  # o_proj
        ]
        return mats

    def expert_matrices(self, width: int) -> list[tuple[int, int]]:
        return [(width, self.hidden), (width, self.hidden), (self.hidden, width)]  # gate, up, down

    def norm_params_per_layer(self) -> int:
        q_norm = self.q_lora_rank or 0
        return 2 * self.hidden + q_norm + self.kv_lora_rank

    def total_params(self) -> int:
        """Every parameter of the checkpoint (embedding and lm_head are not tied)."""

        def n(mats):
            return sum(r * c for r, c in mats)

        total = 2 * self.vocab * self.hidden + self.hidden  # embed, lm_head, final norm
        total += self.layers * (n(self.attention_matrices()) + self.norm_params_per_layer())
        total += self.first_k_dense_replace * n(self.expert_matrices(self.intermediate))
        per_moe = (self.n_routed_experts + self.n_shared_experts) * n(self.expert_matrices(self.moe_intermediate))
        per_moe += self.n_routed_experts * self.hidden + self.n_routed_experts  # router weight, bias
        total += self.moe_layers * per_moe
        return total


def _matrix_bytes(mats: list[tuple[int, int]], dtype: str) -> float:
    per = WEIGHT_BYTES[dtype]
    scale = INT8_SCALE_BYTES_PER_ROW if dtype == "int8" else 0
    return sum(r * c * per + r * scale for r, c in mats)


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes a batch-1 decode step must read from memory, by part."""

    attention: float
    dense_mlp: float
    routed_experts: float
    shared_experts: float
    router: float
    lm_head: float
    embedding_row: float
    norms: float
    kv_cache: float

    @property
    def weights(self) -> float:
        return self.total - self.kv_cache

    @property
    def total(self) -> float:
        return (self.attention + self.dense_mlp + self.routed_experts + self.shared_experts + self.router
                + self.lm_head + self.embedding_row + self.norms + self.kv_cache)


# What zizhu's greedy decode reads of a full-precision head per row of it (Platform.greedy_head on
# the CPU): the int8 screen (one byte an element), its scale and two bounds (4 bytes each). The few
# panels it recomputes exactly (~8 of 16 rows x hidden a token on the small model) are left out.
SCREEN_BYTES_PER_ROW = 12


def decode_bytes_per_token(shape: MLAShape, weight_dtype: str, context_tokens: int = 0,
                           kv_bytes_per_token: float = 0.0, screened_head: bool = False) -> DecodeBytes:
    """Bytes read to decode one token at batch 1.

    Only the experts the router selects are read: top-k routed plus the shared ones. The embedding
    contributes one row; norms and the router stay in fp32 (the spec keeps the router in fp32);
    the embedding row keeps the weight dtype's element size, unquantized. `context_tokens` x
    `kv_bytes_per_token` adds the KV cache read by attention. With `screened_head`, a
    full-precision lm_head counts as the int8 screen that greedy decoding reads instead.
    """
    per = WEIGHT_BYTES[weight_dtype]
    experts = shape.expert_matrices(shape.moe_intermediate)
    return DecodeBytes(
        attention=shape.layers * _matrix_bytes(shape.attention_matrices(), weight_dtype),
        dense_mlp=shape.first_k_dense_replace * _matrix_bytes(shape.expert_matrices(shape.intermediate), weight_dtype),
        routed_experts=shape.moe_layers * shape.experts_per_token * _matrix_bytes(experts, weight_dtype),
        shared_experts=shape.moe_layers * shape.n_shared_experts * _matrix_bytes(experts, weight_dtype),
        router=shape.moe_layers * (shape.n_routed_experts * shape.hidden + shape.n_routed_experts) * 4.0,
        lm_head=(shape.vocab * (shape.hidden + SCREEN_BYTES_PER_ROW) if screened_head and weight_dtype != "int8"
                 else _matrix_bytes([(shape.vocab, shape.hidden)], weight_dtype)),
        embedding_row=shape.hidden * (4.0 if weight_dtype == "int8" else per),
        norms=(shape.layers * shape.norm_params_per_layer() + shape.hidden) * 4.0,
        kv_cache=context_tokens * kv_bytes_per_token,
    )


def roofline_tokens_per_s(bandwidth_bytes_per_s: float, decode: DecodeBytes) -> float:
    """Upper bound on batch-1 decode speed when every step streams its bytes from DRAM once."""
    return bandwidth_bytes_per_s / decode.total


# --- KV cache bytes per token (all layers, one sequence), by each engine's cache format ---------

def kv_bytes_latent(shape: MLAShape, dtype_bytes: float) -> float:
    """MLA latent cache (zizhu, llama.cpp with MLA, DeepSeek's code): c_kv + k_pe per layer."""
    return (shape.kv_lora_rank + shape.qk_rope_head_dim) * shape.layers * dtype_bytes


def kv_bytes_expanded(shape: MLAShape, dtype_bytes: float) -> float:
    """Per-head K and V (HF transformers' DynamicCache): K is nope+rope wide, V is v_head_dim wide."""
    return shape.heads * (shape.qk_head_dim + shape.v_head_dim) * shape.layers * dtype_bytes


def kv_bytes_expanded_padded(shape: MLAShape, dtype_bytes: float) -> float:
    """Per-head K and V with V padded to K's width (vLLM with MLA disabled: one head size)."""
    return shape.heads * 2 * max(shape.qk_head_dim, shape.v_head_dim) * shape.layers * dtype_bytes
