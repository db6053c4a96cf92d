"""DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zizhu import ops
from zizhu.config import ModelConfig
from zizhu.layers.linear import Linear
from zizhu.layers.norm import RMSNorm
from zizhu.ops.moe import Routing


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Used for dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, platform):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, dtype, platform)
        self.up_proj = Linear(hidden, inter, dtype, platform)
        self.down_proj = Linear(inter, hidden, dtype, platform)
        self.w13: torch.Tensor | None = None  # [1, 2 * inter, hidden], gate then up: decode_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_block(self, norm: RMSNorm) -> ops.MoEBlock | None:
        """This MLP behind `norm`, for `Platform.decode_layers`: one shared expert, no router (as
        Int8MLP's). Gate and up are stacked into one w13 on the first call, and the two projections'
        weights become views of it, so the values are held once."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if any(type(p) is not Linear or not isinstance(p.weight, torch.Tensor) or p.bias is not None for p in projections):
            return None
        if self.w13 is None:
            gate, up = self.gate_proj, self.up_proj
            w13 = torch.cat([gate.weight, up.weight])
            gate.weight = nn.Parameter(w13[: gate.out_features], requires_grad=False)
            up.weight = nn.Parameter(w13[gate.out_features :], requires_grad=False)
            self.w13 = w13[None]
        return ops.MoEBlock(norm.weight, norm.eps, None, None, None, 1, self.w13, self.down_proj.weight[None], None, None)


class Router(nn.Module):
    """The router's weights (kept fp32) and rule; the platform routes with them, in the same call
    that runs the experts (`Platform.route_and_run_experts`, see `ops.route_experts`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        num_experts = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(num_experts, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = None
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
        self.routing = Routing(
            top_k=cfg.num_experts_per_tok,
            scoring=cfg.scoring_func,
            method=cfg.topk_method,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            scaling=cfg.routed_scaling_factor,
        )


def prepare_int8_pair(module: nn.Module, platform) -> None:
    """Hand a module's int8 stacks `w13` and `w2` (buffers, their scales beside them) to the platform
    (`Platform.prepare_experts`), and take its form of them only if both came back prepared: the
    kernels read the two as a pair."""
    w13, w2 = platform.prepare_experts(module.w13), platform.prepare_experts(module.w2)
    if w13 is not module.w13 and w2 is not module.w2:
        module.register_buffer("w13", w13)
        module.register_buffer("w2", w2)


class Experts(nn.Module):
    """All routed experts of a layer as two stacked tensors, so a platform can run them grouped
    (and, where the platform sums experts in fp32, the shared ones after them: MoE.fold_shared_experts)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        self.inter = inter

    def prepare(self, platform) -> None:
        """Hand the loaded stacks, shared experts folded in, to the platform (`Platform.prepare_experts`):
        it may repack them in place, so nothing reads them as `[E, N, K]` afterwards. int8 stacks (as
        quantize_experts left them, with their scales) are taken in their new form only if both came
        back prepared: the kernels read w13 and w2 as a pair."""
        if not self.w13.is_floating_point():
            prepare_int8_pair(self, platform)
            return
        for name in ("w13", "w2"):
            weight = getattr(self, name)
            prepared = platform.prepare_experts(weight)
            if prepared is not weight:
                setattr(self, name, nn.Parameter(prepared, requires_grad=False))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, platform, dtype: torch.dtype):
        super().__init__()
        self.platform = platform
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, platform)
            if cfg.n_shared_experts
            else None
        )
        self.num_shared = 0  # shared experts folded into `experts` (fold_shared_experts)

    def fold_shared_experts(self) -> None:
        """Move the shared experts into the stacked routed ones, as always-chosen experts of weight 1,
        so one grouped call per layer runs both and decode pays one dispatch and one pass of thread
        barriers instead of two. A SwiGLU MLP of width n x I is exactly the sum of n experts of
        width I, each a slice of its intermediate dimension: a checkpoint's shared MLP becomes
        n_shared_experts stacked experts. Only where the platform sums experts in fp32
        (`Platform.folds_shared_experts`): rounding each slice's down-projection to bf16 before the
        sum moved greedy tokens in the tests."""
        mlp = self.shared_experts
        if mlp is None or not self.platform.folds_shared_experts(self.experts.w13.dtype):
            return
        inter, hidden = self.experts.inter, mlp.down_proj.weight.shape[0]
        n = mlp.gate_proj.weight.shape[0] // inter
        gate = mlp.gate_proj.weight.view(n, inter, hidden)
        up = mlp.up_proj.weight.view(n, inter, hidden)
        down = mlp.down_proj.weight.view(hidden, n, inter).transpose(0, 1)  # [n, hidden, inter]
        with torch.no_grad():
            self.experts.w13 = nn.Parameter(torch.cat([self.experts.w13, torch.cat([gate, up], dim=1)]), requires_grad=False)
            self.experts.w2 = nn.Parameter(torch.cat([self.experts.w2, down]), requires_grad=False)
        self.num_shared = n
        self.shared_experts = None

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, add_input: bool = False) -> torch.Tensor:
        """`(x if add_input else 0) + MoE(norm(x))`: the layer's post-attention norm and residual add
        come in so that the platform can run the whole block as one call."""
        if self.shared_experts is None:  # none, or folded into `experts`: one platform call
            return self._experts(x, norm, add_input)
        # not folded (bf16): the shared MLP apart, summed with the routed experts before x is added
        h = x if norm is None else norm(x)
        out = self._experts(h, None, False) + self.shared_experts(h)
        return x + out if add_input else out

    def decode_block(self, norm: RMSNorm) -> ops.MoEBlock | None:
        """This block for `Platform.decode_layers`, behind `norm`: the shared experts folded, or none."""
        if self.shared_experts is not None:
            return None
        experts, gate = self.experts, self.gate
        return ops.MoEBlock(
            norm.weight, norm.eps, gate.weight, gate.e_score_correction_bias, gate.routing, self.num_shared,
            experts.w13, experts.w2, getattr(experts, "w13_scale", None), getattr(experts, "w2_scale", None),
        )

    def _experts(self, x: torch.Tensor, norm: RMSNorm | None, add_input: bool) -> torch.Tensor:
        experts, gate = self.experts, self.gate
        return self.platform.route_and_run_experts(
            x, gate.weight, gate.e_score_correction_bias, gate.routing, self.num_shared, experts.w13, experts.w2,
            getattr(experts, "w13_scale", None), getattr(experts, "w2_scale", None),
            None if norm is None else norm.weight, 0.0 if norm is None else norm.eps, add_input,
        )
