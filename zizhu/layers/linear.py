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
        self.prepared = None  # the platform's own layout of the weight, once `prepare` has run

    def prepare(self) -> None:
        """Hand the loaded weight to the platform, which may keep it in a layout of its own kernels
        (the CPU packs the vocabulary projection into column panels). The weight is then no longer
        an [out, in] tensor, so call this only on a projection nothing else reads, never on a tied one."""
        prepared = self.platform.prepare_linear(self.weight)
        if prepared is not self.weight:
            del self.weight  # the prepared layout holds the same values; keep one copy in memory
            self.prepared = prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.platform.linear(x, self.weight if self.prepared is None else self.prepared, self.bias)
