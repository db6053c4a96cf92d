import torch
from torch import nn


class RMSNorm(nn.Module):
    """Its weight is kept in the activations' dtype (`Platform.activation_dtype`): a bf16 model's
    norms on a CPU load as fp32 copies (exact, a few KB), so no kernel widens them per call."""

    def __init__(self, dim: int, eps: float, platform, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=platform.activation_dtype(dtype)), requires_grad=False)
        self.eps = eps
        self.platform = platform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.platform.rms_norm(x, self.weight, self.eps)
