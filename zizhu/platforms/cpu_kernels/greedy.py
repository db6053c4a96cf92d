"""ctypes entry of greedy tokens from a screened head (greedy_head.c), and the screen built at load."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from zizhu.platforms.cpu_kernels.layout import Int8Panels, PackedWeight, bf16_flag, pack_int8_panels


@dataclass(frozen=True)
class GreedyScreen:
    """An int8 copy of a full-precision vocabulary head `w [N, K]` and how far each of its rows may be
    from the original, with which greedy_head.c screens a row's logits before recomputing the few
    tokens that could win (the whole story is in that file)."""

    q: Int8Panels  # w_n ~= q_n * scale[n]
    scale: torch.Tensor  # [N] fp32
    dw: torch.Tensor  # [N] fp32, |w_n - q_n scale_n| rounded up
    g: torch.Tensor  # [N] fp32, max(|w_n|, |q_n scale_n|) rounded up


# Head rows screened at a time while building a screen: its temporaries (the rows in double) stay
# this many elements, not the head's.
SCREEN_CHUNK = 1 << 21


def greedy_screen(weight: torch.Tensor) -> GreedyScreen | None:
    """The screen of an fp32 or bf16 head `[N, K]`, read before it is packed: its int8 rows as an int8
    model's (quantize_int8_rows) and their distances; None when a value is not finite (no bound
    would hold)."""
    from zizhu.layers.quant import quantize_int8_rows  # layers import the platforms: not at load

    n, k = weight.shape
    q, scale = quantize_int8_rows(weight)
    dw, g = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    step = max(1, SCREEN_CHUNK // max(1, k))
    for start in range(0, n, step):
        exact = weight[start : start + step].double()
        if not torch.isfinite(exact).all():
            return None
        approx = q[start : start + step].double() * scale[start : start + step].double()[:, None]
        dw[start : start + step] = (exact - approx).norm(dim=-1).float()
        g[start : start + step] = torch.maximum(exact.norm(dim=-1), approx.norm(dim=-1)).float()
    up = torch.tensor(float("inf"))
    return GreedyScreen(pack_int8_panels(q), scale, torch.nextafter(dw, up), torch.nextafter(g, up))


def greedy_head(lib: ctypes.CDLL, x: torch.Tensor, weight: PackedWeight, screen: GreedyScreen) -> torch.Tensor:
    """`argmax(x @ w^T, dim=-1)` for fp32 `x [B, K]` and a packed head with its screen (greedy_head.c):
    the tokens of the full product, bit for bit, without most of it. int64 `[B]`."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        lib.greedy_head_f32(
            x.data_ptr(), x.stride(0), x.shape[0], weight.in_features, weight.panels.data_ptr(),
            weight.tail.data_ptr(), bf16_flag(weight.panels), weight.out_features, screen.q.panels.data_ptr(),
            screen.scale.data_ptr(), screen.dw.data_ptr(), screen.g.data_ptr(), out.data_ptr(),
            torch.get_num_threads(),
        )
    return out
