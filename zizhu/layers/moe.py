"""DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zizhu.config import ModelConfig
from zizhu.layers.mla import _linear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Used for dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = _linear(hidden, inter, dtype)
        self.up_proj = _linear(hidden, inter, dtype)
        self.down_proj = _linear(inter, hidden, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Chooses top-k experts per token. Runs in fp32: routing decisions are sensitive to rounding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        num_experts = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(num_experts, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight)
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        num_tokens, num_experts = scores.shape
        groups = cfg.n_group
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias  # the bias steers selection, never the weights
            if groups > 1:
                per_group = choice.view(num_tokens, groups, -1)
                group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
                choice = self._mask_groups(choice, group_scores, float("-inf"))
            ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        else:
            if cfg.topk_method == "group_limited_greedy" and groups > 1:
                group_scores = scores.view(num_tokens, groups, -1).max(dim=-1).values
                scores = self._mask_groups(scores, group_scores, 0.0)
            weights, ids = scores.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor

    def _mask_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        keep = group_scores.topk(self.cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(scores.shape[-1] // group_scores.shape[-1], dim=-1)
        return scores.masked_fill(~expert_mask, fill)


class Experts(nn.Module):
    """All routed experts of a layer as two stacked tensors, so a platform can run them grouped."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        self.inter = inter


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, platform, dtype: torch.dtype):
        super().__init__()
        self.platform = platform
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        experts = self.experts
        out = self.platform.moe_experts(
            x, ids, weights, experts.w13, experts.w2, getattr(experts, "w13_scale", None), getattr(experts, "w2_scale", None)
        )
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
