"""Weight-only int8 quantization applied at load: per-output-row symmetric scales.

Activations stay in the compute dtype, so results stay batch-invariant (no per-batch activation
scales) and close to the unquantized model. Kept in full precision: the embedding, the router
(routing is sensitive to rounding), norms, and kv_b_proj (small, and it feeds the absorbed decode).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from zizhu import ops
from zizhu.layers.linear import prepare_weight
from zizhu.layers.moe import MLP, Experts, prepare_int8_pair

logger = logging.getLogger(__name__)

SUPPORTED = ("int8",)
KEEP_FULL_PRECISION = ("kv_b_proj",)


# Elements quantized at a time: each temporary of the arithmetic is this size, not the weight's (the
# fp32 vocabulary head of the small benchmark model is 530 MB, and whole-tensor arithmetic held
# three such temporaries at the peak of loading).
QUANTIZE_CHUNK = 1 << 22


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[:, None]; returns (q [..., N, K] int8, scale [..., N] fp32)."""
    rows = w.reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, QUANTIZE_CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].float()
        s = chunk.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
        q[start : start + step] = torch.round(chunk / s[:, None]).clamp(-127, 127)
        scale[start : start + step] = s
    return q.view(w.shape), scale.view(w.shape[:-1])


# what quantizing weights that a platform has laid out for its kernels (Platform.prepare_*) raises
PREPARED = "quantize weights as loaded, before the platform prepares them"


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, platform):
        super().__init__()
        if not isinstance(linear.weight, torch.Tensor):
            raise ValueError(f"{PREPARED}: {type(linear.weight).__name__}")
        q, scale = quantize_int8_rows(linear.weight.data)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.platform = platform
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def prepare(self) -> None:
        """Hand the loaded int8 weight to the platform (see `prepare_weight`)."""
        prepare_weight(self, "qweight")

    def forward(self, x: torch.Tensor, norm=None) -> torch.Tensor:
        """`self(norm(x))`, the norm (an RMSNorm feeding only this projection) fused when the platform can."""
        if norm is None:
            out = self.platform.int8_linear(x, self.qweight, self.scale)
        else:
            out = self.platform.rms_norm_int8_linear(x, norm.weight, norm.eps, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


class Int8MLP(nn.Module):
    """A SwiGLU MLP (dense layer or shared expert) as a single always-chosen int8 expert, so the
    platform runs gate, up, SiLU and down in one MoE call instead of three matmuls and two ops."""

    def __init__(self, mlp: MLP, platform):
        super().__init__()
        w13 = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])[None]
        q13, s13 = quantize_int8_rows(w13)
        q2, s2 = quantize_int8_rows(mlp.down_proj.weight.data[None])
        dtype = mlp.down_proj.weight.dtype
        self.register_buffer("w13", q13)
        self.register_buffer("w13_scale", s13.to(dtype))
        self.register_buffer("w2", q2)
        self.register_buffer("w2_scale", s2.to(dtype))
        self.platform = platform

    def prepare(self) -> None:
        """Hand the stacks to the platform (`Platform.prepare_experts`), as routed experts are."""
        prepare_int8_pair(self, self.platform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
        weights = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return self.platform.moe_experts(x, ids, weights, self.w13, self.w2, self.w13_scale, self.w2_scale)

    def decode_block(self, norm) -> ops.MoEBlock:
        """This MLP behind `norm`, for `Platform.decode_layers`: one shared expert, no router."""
        return ops.MoEBlock(norm.weight, norm.eps, None, None, None, 1, self.w13, self.w2, self.w13_scale, self.w2_scale)


def quantize_experts(experts: Experts) -> None:
    """Replace stacked expert weights by int8 with per-(expert, row) scales, in place."""
    if experts.w13.dim() != 3:
        raise ValueError(f"{PREPARED}: experts of shape {tuple(experts.w13.shape)}")
    for name in ("w13", "w2"):
        q, scale = quantize_int8_rows(getattr(experts, name).data)
        dtype = getattr(experts, name).dtype
        delattr(experts, name)
        experts.register_buffer(name, q)
        experts.register_buffer(f"{name}_scale", scale.to(dtype))


def check_method(method: str) -> None:
    if method not in SUPPORTED:
        from zizhu.errors import ConfigError

        raise ConfigError(f"quantization {method!r} is not supported (supported: {', '.join(SUPPORTED)})")


def quantize_model(model: nn.Module, method: str, platform) -> None:
    """Quantize, in place, every full-precision block under `model` (blocks already done are left)."""
    check_method(method)
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for child_name, child in list(parent.named_children()):
            if isinstance(child, MLP):
                setattr(parent, child_name, Int8MLP(child, platform))
            elif isinstance(child, nn.Linear) and child_name not in KEEP_FULL_PRECISION:
                setattr(parent, child_name, Int8Linear(child, platform))
            elif isinstance(child, Experts) and child.w13.dtype != torch.int8:
                quantize_experts(child)
            else:
                visit(child)
                continue
            count += 1

    visit(model)
    logger.debug("quantized %d linear, MLP and expert blocks to int8 (weight-only)", count)
