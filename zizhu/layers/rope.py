"""Rotary embeddings for the decoupled k_pe / q_pe dims, with DeepSeek's YaRN extension."""

from __future__ import annotations

import math

import torch
from torch import nn

from zizhu.config import RopeConfig, yarn_mscale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2], factor applied to cos and sin)."""
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / base
    if rope.type == "default":
        return extrapolation, 1.0
    interpolation = 1.0 / (rope.factor * base)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if rope.attention_factor is not None:
        factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = yarn_mscale(rope.factor)
    return inv_freq, float(factor)


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotation for a step's positions; the rotation itself is
    `ops.apply_rotary`, run by the platform's `mla_write_latent`."""

    def __init__(self, rope: RopeConfig, dim: int):
        super().__init__()
        self.rope, self.dim = rope, dim
        self.interleaved = rope.interleaved
        self._inv_freq: torch.Tensor | None = None  # built on first use, on the device of the positions
        self._last: tuple | None = None
        self.cos_sin_factor = inverse_frequencies(rope, dim)[1]

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = inverse_frequencies(self.rope, self.dim)[0].to(device)
        return self._inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for a step's positions, computed once and reused by every layer of that step."""
        cached = self._last
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        freqs = positions.to(torch.float32)[:, None] * self._frequencies(positions.device)[None, :]  # [T, P / 2]
        cos = (freqs.cos() * self.cos_sin_factor).to(dtype)
        sin = (freqs.sin() * self.cos_sin_factor).to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin
