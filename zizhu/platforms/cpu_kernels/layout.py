"""How the CPU kernels want their weights laid out: the flags and packings that `Platform.prepare_*`
apply once at load (full-precision panels, int8 panels, expert stacks), and how a prepared weight
is read back."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

# Full-precision weights the fp32 kernels read as they are (gemm.c: a bf16 weight widens by a shift).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def bf16_flag(t) -> int:
    """The kernels' type flag for a full-precision tensor or packed weight: 1 for bf16, 0 for fp32."""
    return int(stored(t).dtype == torch.bfloat16)


PANEL = 16  # output columns per panel of a packed weight (gemm_packed.c)


@dataclass(frozen=True)
class PackedWeight:
    """An fp32 or bf16 `[out_features, in_features]` weight repacked in place for gemm_packed.c, in its
    own dtype: `panels[p, k, j]` is row 16p + j, column k of the original; the last out_features % 16
    rows sit zero-padded in `tail`."""

    panels: torch.Tensor  # [out // 16, in, 16], the original weight's storage
    tail: torch.Tensor  # [in, 16]
    out_features: int
    in_features: int


def can_pack(weight: torch.Tensor) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dtype in WEIGHT_DTYPES and weight.dim() == 2 and weight.is_contiguous()


def pack_weight(lib: ctypes.CDLL, weight: torch.Tensor) -> PackedWeight:
    """Repack a weight (see can_pack) in place: its storage is reused, so do not read it as [N, K]
    afterwards."""
    n, k = weight.shape
    tail = torch.zeros(k, PANEL, dtype=weight.dtype)
    lib.pack_panels(weight.data_ptr(), tail.data_ptr(), n, k, bf16_flag(weight), torch.get_num_threads())
    panels = weight.detach().view(-1)[: n // PANEL * PANEL * k].view(n // PANEL, k, PANEL)
    return PackedWeight(panels, tail, n, k)


def can_pack_experts(weight: torch.Tensor) -> bool:
    """Whether a stacked expert weight `[E, N, K]` packs without a tail: each expert's panels then
    sit where its rows did, which moe_f32 relies on."""
    return weight.dtype in WEIGHT_DTYPES and weight.dim() == 3 and weight.shape[1] % PANEL == 0 and weight.is_contiguous()


def pack_experts(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    """Repack stacked experts (see can_pack_experts) in place, as `[E, N / 16, K, 16]` panels (one
    pack_panels call: the N rows of every expert are whole panels). The storage is reused, so do
    not read `weight` as `[E, N, K]` afterwards."""
    experts, n, k = weight.shape
    lib.pack_panels(weight.data_ptr(), None, experts * n, k, bf16_flag(weight), torch.get_num_threads())
    return weight.detach().view(experts, n // PANEL, k, PANEL)


def can_pack_int8_experts(weight: torch.Tensor) -> bool:
    """Whether stacked int8 experts `[E, N, K]` pack into int8 panels with each expert's panels where
    its rows were (N a multiple of 16), which moe_f32 relies on."""
    return weight.dtype == torch.int8 and weight.dim() == 3 and weight.shape[1] % PANEL == 0 and weight.is_contiguous()


def pack_int8_experts(weight: torch.Tensor) -> torch.Tensor:
    """A copy of stacked int8 experts (see can_pack_int8_experts) in int8 panels, `[E, N / 16, ceil(K / 2),
    16, 2]` (Int8Panels' layout, expert by expert): moe_f32 then meets up to six of an expert's rows
    with each panel in outer products (gemm.c's moe_int8_panels, with what it gains)."""
    experts, n, k = weight.shape
    pairs = -(-k // 2)
    padded = weight if k == 2 * pairs else torch.nn.functional.pad(weight, (0, 1))
    return padded.view(experts, n // PANEL, PANEL, pairs, 2).transpose(2, 3).contiguous()


def is_packed_experts(weight: torch.Tensor) -> bool:
    """Whether stacked experts are in panels: full precision `[E, N / 16, K, 16]` or int8 `[E, N / 16, ceil(K / 2), 16, 2]`."""
    return weight.dim() >= 4


def packed_flags(w13: torch.Tensor, w2: torch.Tensor) -> int:
    """moe_f32's w_packed: bit 0 when w13, bit 1 when w2 is in panels (prepared apart, a full-precision
    pair may differ: w13 packs when 2I is a multiple of 16, w2 when D is)."""
    return int(is_packed_experts(w13)) | int(is_packed_experts(w2)) << 1


def expert_rows(weight: torch.Tensor) -> int:
    """N of a stacked expert weight, `[E, N, K]` or packed (see is_packed_experts)."""
    return weight.shape[1] * weight.shape[3] if is_packed_experts(weight) else weight.shape[1]


@dataclass(frozen=True)
class Int8Panels:
    """An int8 `[out_features, in_features]` weight in panels of 16 rows for gemm_int8_panels.c: row
    16p + j, column 2t + i at `panels[p, t, j, i]`, zero-padded to whole panels and pairs."""

    panels: torch.Tensor  # [ceil(out / 16), ceil(in / 2), 16, 2] int8
    out_features: int
    in_features: int


def pack_int8_panels(q: torch.Tensor) -> Int8Panels:
    """A copy of an int8 weight `[N, K]` in panels (see Int8Panels)."""
    n, k = q.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = torch.zeros(panels * PANEL, pairs * 2, dtype=torch.int8)
    padded[:n, :k] = q
    return Int8Panels(padded.view(panels, PANEL, pairs, 2).transpose(1, 2).contiguous(), n, k)


def stored(w: "torch.Tensor | PackedWeight | Int8Panels") -> torch.Tensor:
    """The tensor that holds a projection's values: a packed one's panels, else the weight itself."""
    return w.panels if isinstance(w, (PackedWeight, Int8Panels)) else w
