"""Rotary position embedding applied to the rope dims of MLA's queries and keys."""

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of `x` (P wide) by `cos`/`sin` (P / 2 wide, broadcast over the rest).

    Interleaved pairs (2i, 2i+1) come out as [rotated evens | rotated odds]: a fixed permutation
    of the rope dims, applied to q and k alike, so every dot product is unchanged.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
