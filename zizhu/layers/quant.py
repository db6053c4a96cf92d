"""Weight-only int8 quantization applied at load: per-output-row symmetric scales.

Activations stay in the compute dtype, so results stay batch-invariant (no per-batch activation
scales) and close to the unquantized model. Kept in full precision: the embedding, the router
(routing is sensitive to rounding), norms, and kv_b_proj (small, and it feeds the absorbed decode).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from zizhu.layers.moe import Experts

logger = logging.getLogger(__name__)

SUPPORTED = ("int8",)
KEEP_FULL_PRECISION = ("kv_b_proj",)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[:, None]; returns (q [..., N, K] int8, scale [..., N] fp32)."""
    w = w.float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, platform):
        super().__init__()
        q, scale = quantize_int8_rows(linear.weight.data)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.platform = platform
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.platform.int8_linear(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


def quantize_experts(experts: Experts) -> None:
    """Replace stacked expert weights by int8 with per-(expert, row) scales, in place."""
    for name in ("w13", "w2"):
        q, scale = quantize_int8_rows(getattr(experts, name).data)
        dtype = getattr(experts, name).dtype
        delattr(experts, name)
        experts.register_buffer(name, q)
        experts.register_buffer(f"{name}_scale", scale.to(dtype))


def quantize_model(model: nn.Module, method: str, platform) -> None:
    if method not in SUPPORTED:
        from zizhu.errors import ConfigError

        raise ConfigError(f"quantization {method!r} is not supported (supported: {', '.join(SUPPORTED)})")
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name not in KEEP_FULL_PRECISION:
                setattr(parent, child_name, Int8Linear(child, platform))
                count += 1
            elif isinstance(child, Experts):
                quantize_experts(child)
                count += 1
    logger.info("quantized %d linear and expert blocks to int8 (weight-only)", count)
