import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scale[:, None]).T for int8 `qweight [N, K]` with per-row `scale [N]`."""
    return F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
