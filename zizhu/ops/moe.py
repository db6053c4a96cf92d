"""Routed experts, grouped: tokens are sorted by expert so each selected expert runs once per step."""

import torch
import torch.nn.functional as F

from zizhu.ops.linear import int8_linear


def moe_experts(
    x: torch.Tensor,  # [T, D]
    topk_ids: torch.Tensor,  # [T, K] int
    topk_weights: torch.Tensor,  # [T, K] fp32
    w13: torch.Tensor,  # [E, 2 * I, D]: gate rows then up rows
    w2: torch.Tensor,  # [E, D, I]
    w13_scale: torch.Tensor | None = None,  # [E, 2 * I] when w13 is int8 (weight-only quantized)
    w2_scale: torch.Tensor | None = None,  # [E, D]
    int8_matmul=int8_linear,  # a platform passes its own int8 kernel
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k  # source token of each sorted (token, expert) pair
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    routed = x.index_select(0, token_of)  # [T*K, D]
    out = torch.empty_like(routed)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        chunk = routed[start : start + count]
        if w13_scale is None:
            gate, up = F.linear(chunk, w13[expert]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, w2[expert])
        else:
            gate, up = int8_matmul(chunk, w13[expert], w13_scale[expert]).chunk(2, dim=-1)
            out[start : start + count] = int8_matmul(F.silu(gate) * up, w2[expert], w2_scale[expert])
        start += count
    weights = topk_weights.reshape(-1)[order].to(out.dtype)
    result = torch.zeros_like(x)
    result.index_add_(0, token_of, out * weights[:, None])
    return result
