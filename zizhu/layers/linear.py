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

    def prepare(self) -> None:
        """Hand the loaded weight to the platform (see `prepare_weight`)."""
        prepare_weight(self, "weight")

    def forward(self, x: torch.Tensor, norm=None) -> torch.Tensor:
        """`self(norm(x))`: the signature of Int8Linear's, which fuses the norm."""
        return self.platform.linear(x if norm is None else norm(x), self.weight, self.bias)


def prepare_weight(module: nn.Module, name: str) -> None:
    """Replace `module.<name>` by the platform's own layout of it (`Platform.prepare_linear`; the CPU
    packs the vocabulary head into column panels), which the platform's linear ops then receive as
    the weight. It may reuse the weight's storage and is no longer an [out, in] tensor, so call this
    only on a projection nothing else reads, never on a tied one."""
    weight = getattr(module, name)
    prepared = module.platform.prepare_linear(weight)
    if prepared is not weight:
        delattr(module, name)  # drop the registered tensor: one copy of the values in memory
        setattr(module, name, prepared)
