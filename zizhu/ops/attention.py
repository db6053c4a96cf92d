"""MLA attention over the paged latent cache.

The cache of one layer is `[num_blocks, block_size, kv_lora_rank + rope_dim]`: each row is the
normalised c_kv followed by the roped k_pe of one token. Nothing per head is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zizhu.ops.norm import rms_norm
from zizhu.ops.rope import apply_rotary


def write_kv_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    """Store `latent [T, W]` at flat slots (block * block_size + offset) of `cache`."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent.to(cache.dtype))


def mla_write_latent(
    q: torch.Tensor,  # [T, H, D_nope + P]: its rope dims are rotated in place
    kv_a: torch.Tensor,  # [T, R + P]: c_kv before its norm, then k_pe before rotation
    norm_weight: torch.Tensor,  # [R] kv_a_layernorm
    eps: float,
    cos: torch.Tensor,  # [T, P / 2]
    sin: torch.Tensor,
    interleaved: bool,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rms_norm=rms_norm,  # a platform passes its own norm and cache write
    write=write_kv_cache,
) -> None:
    """Everything between the projections and attention for the new tokens: normalise c_kv,
    rotate k_pe and q's rope dims (q in place), store [c_kv | k_pe] at the tokens' slots."""
    rank = norm_weight.shape[0]
    rope = kv_a.shape[-1] - rank
    c_kv, k_pe = kv_a.split([rank, rope], dim=-1)
    q[..., -rope:] = apply_rotary(q[..., -rope:], cos[:, None, :], sin[:, None, :], interleaved)
    write(cache, slot_mapping, torch.cat([rms_norm(c_kv, norm_weight, eps), apply_rotary(k_pe, cos, sin, interleaved)], dim=-1))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence, `[length, W]`, or of several sequences at once
    when `block_table` is `[G, max_blocks]`: `[G, length, W]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    rows = cache[block_table[..., :num_blocks]]  # [(G,) num_blocks, block_size, W]
    return rows.reshape(*block_table.shape[:-1], -1, cache.shape[-1])[..., :length, :]


def paged_mla_decode(
    q_latent: torch.Tensor,  # [B, H, R + P]: absorbed q_nope (R) then roped q_pe (P); sets the compute dtype
    cache: torch.Tensor,  # [num_blocks, block_size, R + P]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int: tokens visible to each query (its own included)
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, weight-absorbed: returns the attended latent `[B, H, R]`."""
    batch, _, width = q_latent.shape
    block_size = cache.shape[1]
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    context = cache[block_tables[:, :num_blocks]].reshape(batch, -1, width).to(q_latent.dtype)  # [B, L, R + P]
    scores = torch.bmm(q_latent, context.transpose(1, 2)) * scale  # [B, H, L]
    positions = torch.arange(context.shape[1], device=scores.device)
    scores.masked_fill_((positions[None, :] >= seq_lens[:, None])[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_latent.dtype)
    return torch.bmm(probs, context[..., :kv_lora_rank])  # [B, H, R] in the query's dtype


def mla_decode(
    q_nope: torch.Tensor,  # [B, H, D_nope]
    q_pe: torch.Tensor,  # [B, H, P], roped
    w_uk: torch.Tensor,  # [H, D_nope, R]: the key half of kv_b_proj, per head
    w_uv: torch.Tensor,  # [H, D_v, R]: the value half
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    paged_attention=paged_mla_decode,  # a platform passes its own latent attention
) -> torch.Tensor:
    """Weight-absorbed decode, one query token per sequence: returns `[B, H, D_v]` in fp32.

    Runs in fp32 whatever the model dtype: q_latent sums over the nope dims and the scores over the
    latent, so rounding them to bf16 can flip a peaky head between near-equal keys.
    """
    q_latent = torch.einsum("bhn,hnr->bhr", q_nope.float(), w_uk.float())
    o_latent = paged_attention(
        torch.cat([q_latent, q_pe.float()], dim=-1), cache, block_tables, seq_lens, w_uk.shape[-1], scale
    )
    return torch.einsum("bhr,hvr->bhv", o_latent.float(), w_uv.float())


def mla_prefill(
    q: torch.Tensor,  # [(G,) Q, H, D_nope + P] queries, the last Q positions of each context
    context: torch.Tensor,  # [(G,) L, R + P] cached latent rows, new tokens included
    kv_b_weight: torch.Tensor,  # [H * (D_nope + D_v), R]
    num_heads: int,
    qk_nope_head_dim: int,
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """Prefill (or a prefill chunk after a cached prefix) with decompressed K/V: returns `[(G,) Q, H, D_v]`.
    With a leading G, that many sequences of the same query and context lengths go through in one
    call (the engine groups them: 64 new 128-token prompts are one call per layer, not 64).

    Decompression costs one matmul over the context but keeps the attention at head width, which is
    cheaper than the absorbed form once there are many queries per sequence.

    V is zero-padded to the query/key head width (192 vs 128 in V3) and the heads passed as one 4-D
    batch: the fused SDPA kernels take only equal widths and 4-D inputs, and PyTorch's fallback for
    anything else materialises every score (measured on 2 CPU cores, 512 tokens, 16 heads: 1.8x
    slower; 3.2x at 2,048).
    """
    grouped = q.dim() == 4
    if not grouped:
        q, context = q[None], context[None]
    groups, num_q = q.shape[:2]
    length, width = context.shape[-2:]
    rope_dim = q.shape[-1] - qk_nope_head_dim
    # the cache may be kept in another dtype than the model's (kv_cache_dtype): compute in q's
    c_kv, k_pe = context.to(q.dtype).split([width - rope_dim, rope_dim], dim=-1)
    kv = F.linear(c_kv, kv_b_weight.to(q.dtype)).view(groups, length, num_heads, qk_nope_head_dim + v_head_dim)
    k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(groups, length, num_heads, rope_dim)], dim=-1)
    if v_head_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_head_dim))
    if num_q == length:
        mask = None
        causal = True
    else:  # query i sits at context position length - num_q + i
        rows = torch.arange(num_q, device=q.device)[:, None] + (length - num_q)
        mask = torch.arange(length, device=q.device)[None, :] <= rows
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale
    )
    out = out[..., :v_head_dim].transpose(1, 2)  # [G, Q, H, D_v]
    return out if grouped else out[0]


@dataclass(frozen=True, eq=False)
class MLADecodeLayer:
    """The weights one MLA layer's decode reads, for `Platform.mla_decode_layer`: checkpoints with a
    q LoRA, the projections either all int8 with per-row scales or all full precision (the model's
    dtype; scales None). The tensors are the model's own, not copies, and fixed once built, so a
    platform may check a bundle once (it compares and hashes by identity)."""

    input_norm: torch.Tensor  # [D], the decoder layer's input RMSNorm
    input_eps: float
    q_kv_a: torch.Tensor  # [q_lora + R + P, D], int8 or full precision: q_a_proj and kv_a_proj_with_mqa fused
    q_kv_a_scale: torch.Tensor | None  # int8: per-row scales; None: full precision
    q_a_norm: torch.Tensor  # [q_lora]
    q_a_eps: float
    q_b: torch.Tensor  # [H * (D_nope + P), q_lora]
    q_b_scale: torch.Tensor | None
    kv_a_norm: torch.Tensor  # [R]
    kv_a_eps: float
    w_uk: torch.Tensor  # [H, D_nope, R], fp32 or as Platform.prepare_absorbed left it
    w_uv: torch.Tensor  # [H, D_v, R]
    o: torch.Tensor  # [D, H * D_v]
    o_scale: torch.Tensor | None
    num_heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    scale: float

    @property
    def q_lora_rank(self) -> int:
        return self.q_a_norm.shape[0]
