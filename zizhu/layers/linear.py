"""The model's full-precision projections."""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """An inference-only nn.Linear whose product runs on the platform: on a CPU a native kernel
    streams a skinny weight twice as fast as MKL's GEMM does for one to a few rows."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, platform, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.weight.requires_grad_(False)
        self.platform = platform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.platform.linear(x, self.weight, self.bias)
