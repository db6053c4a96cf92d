"""ctypes entries of the row-by-row products: int8 and full-precision projections, RMSNorm, argmax."""

from __future__ import annotations

import ctypes

import torch

from zizhu.platforms.cpu_kernels.layout import Int8Panels, PackedWeight, bf16_flag


def kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` as `[M, K]` rows the kernels can walk: dense last dim, any row stride. (A 2-D
    input, all that decode passes, skips the reshape: each torch call costs microseconds here, and a
    step makes a hundred of these calls.)"""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _shaped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Output rows `y [M, N]` in the leading shape of the input `x [..., K]`."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def int8_linear(
    lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> torch.Tensor:
    """fp32 `x [..., K]` times int8 `qweight [N, K]` with fp32 per-row `scale [N]`, each row of x
    rounded to int16 first (gemm_int8.c); with `norm_weight`, x is RMS-normalised first."""
    x2, (n, k) = kernel_rows(x), qweight.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.int8_gemm_f32(
        x2.data_ptr(), qweight.data_ptr(), scale.data_ptr(), y.data_ptr(),
        x2.shape[0], n, k, x2.stride(0), n, None if norm_weight is None else norm_weight.data_ptr(), eps,
        torch.get_num_threads(),
    )
    return _shaped(y, x)


def linear_f32(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 `x [..., K]` times `weight [N, K]`, fp32 or bf16 (see WEIGHT_DTYPES), summed in fp32."""
    x2, (n, k) = kernel_rows(x), weight.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.gemm_f32(
        x2.data_ptr(), weight.data_ptr(), bf16_flag(weight), y.data_ptr(), x2.shape[0], n, k,
        x2.stride(0), n, torch.get_num_threads(),
    )
    return _shaped(y, x)


def linear_packed(lib: ctypes.CDLL, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """fp32 `x [..., K]` times a packed weight: `[..., out_features]` fp32."""
    x2, n = kernel_rows(x), weight.out_features
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        lib.gemm_f32_packed(
            x2.data_ptr(), weight.panels.data_ptr(), weight.tail.data_ptr(), bf16_flag(weight.panels),
            y.data_ptr(),
            x2.shape[0], n, weight.in_features, x2.stride(0), n, torch.get_num_threads(),
        )
    return _shaped(y, x)


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = kernel_rows(x)
    out = torch.empty(x2.shape, dtype=torch.float32)
    lib.rms_norm_f32(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), x2.shape[0], x2.shape[1], eps, torch.get_num_threads())
    return _shaped(out, x)


def argmax_rows(lib: ctypes.CDLL, logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for `[B, V]` fp32 logits with unit column stride: int64 `[B]`."""
    rows, cols = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    lib.argmax_rows_f32(logits.data_ptr(), logits.stride(0), rows, cols, out.data_ptr(), torch.get_num_threads())
    return out


def int8_linear_panels(lib: ctypes.CDLL, x: torch.Tensor, weight: Int8Panels, scale: torch.Tensor) -> torch.Tensor:
    """fp32 `x [..., K]` times an int8 weight in panels with fp32 per-row `scale [N]`, each row of x
    rounded to int16 first (gemm_int8_panels.c)."""
    x2, n = kernel_rows(x), weight.out_features
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        lib.int8_gemm_panels_f32(
            x2.data_ptr(), x2.stride(0), x2.shape[0], weight.in_features, weight.panels.data_ptr(),
            scale.contiguous().data_ptr(), n, y.data_ptr(), n, torch.get_num_threads(),
        )
    return _shaped(y, x)
