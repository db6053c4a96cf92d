"""DeepSeekMoE: routing tokens to experts, and the routed experts grouped so each selected expert
runs once per step."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zizhu.ops.linear import int8_linear


@dataclass(frozen=True)
class Routing:
    """How a router turns logits into (experts, weights): DeepSeek-V2's softmax with greedy or
    group-limited top-k, or V3's sigmoid with bias-steered group selection (noaux_tc)."""

    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    scaling: float = 1.0


def route_experts(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [E, D] fp32 router
    bias: torch.Tensor | None,  # [E] fp32 e_score_correction_bias (noaux_tc), steers selection only
    routing: Routing,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, K], weights [T, K] fp32). Runs in fp32: routing is sensitive to rounding."""
    logits = F.linear(x.float(), weight)
    scores = logits.sigmoid() if routing.scoring == "sigmoid" else logits.softmax(dim=-1)
    num_tokens, num_experts = scores.shape
    groups = routing.n_group
    if routing.method == "noaux_tc":
        choice = scores + bias
        if groups > 1:
            per_group = choice.view(num_tokens, groups, -1)
            group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
            choice = _mask_groups(choice, group_scores, routing.topk_group, float("-inf"))
        ids = choice.topk(routing.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
    else:
        if routing.method == "group_limited_greedy" and groups > 1:
            group_scores = scores.view(num_tokens, groups, -1).max(dim=-1).values
            scores = _mask_groups(scores, group_scores, routing.topk_group, 0.0)
        weights, ids = scores.topk(routing.top_k, dim=-1, sorted=False)
    if routing.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * routing.scaling


def _mask_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep_groups: int, fill: float) -> torch.Tensor:
    keep = group_scores.topk(keep_groups, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    expert_mask = group_mask.repeat_interleave(scores.shape[-1] // group_scores.shape[-1], dim=-1)
    return scores.masked_fill(~expert_mask, fill)


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
