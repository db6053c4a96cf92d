"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Only plain C with OpenMP: no torch headers, so a build takes a few seconds. When no compiler or
no AVX2 is available, `load()` returns None and the platform keeps the reference ops. Each kernel
replaces a run of small torch operators whose dispatch, not arithmetic, dominated decode time.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from zizhu.ops.moe import Routing

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
SOURCES = [SOURCE_DIR / name for name in ("argmax.c", "decode_stack.c", "gemm.c", "gemm_int8.c", "gemm_int8_panels.c", "gemm_packed.c", "greedy_head.c", "mla_decode.c", "mla_latent.c", "mla_layer.c", "moe_route.c", "rms_norm.c")]


def _cache_dir() -> Path:
    root = os.environ.get("ZIZHU_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "zizhu")
    return Path(root).expanduser() / "kernels"


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    if os.environ.get("ZIZHU_DISABLE_NATIVE_KERNELS"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        logger.info("no C compiler found: using reference int8 matmul")
        return None
    source = b"".join(path.read_bytes() for path in [*SOURCES, *sorted(SOURCE_DIR.glob("*.h"))])
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256(source + " ".join(flags).encode() + os.uname().machine.encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                logger.info("native int8 kernel not built (%s): using reference int8 matmul", result.stderr.strip()[:200])
                return None
            os.replace(built, target)  # atomic, so concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    lib.int8_gemm_f32.restype = None
    lib.int8_gemm_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    lib.gemm_f32.restype = None
    lib.gemm_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.pack_panels.restype = lib.gemm_f32_packed.restype = None
    lib.pack_panels.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
    lib.gemm_f32_packed.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.moe_f32.restype = None
    lib.moe_f32.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 2
        + [ctypes.c_int]
    )
    lib.mla_decode_f32.restype = None
    lib.mla_decode_f32.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
        + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
    )
    lib.mla_write_latent_f32.restype = None
    lib.mla_write_latent_f32.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float]
        + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
        + [ctypes.c_int]
    )
    lib.moe_route_f32.restype = None
    lib.moe_route_f32.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
        + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    )
    lib.moe_routed_f32.restype = None
    lib.moe_routed_f32.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
        + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_int] * 2
        + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_float, ctypes.c_int64] + [ctypes.c_void_p] * 4
        + [ctypes.c_int] * 2 + [ctypes.c_int64, ctypes.c_int]
    )
    lib.mla_decode_layer_f32.restype = None
    lib.mla_decode_layer_f32.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_float]
        + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_void_p] * 2
        + [ctypes.c_void_p, ctypes.c_float] + [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
        + [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    )
    lib.decode_stack_f32.restype = None
    lib.decode_stack_f32.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
        + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2
        + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    )
    lib.argmax_rows_f32.restype = None
    lib.argmax_rows_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.int8_gemm_panels_f32.restype = None
    lib.int8_gemm_panels_f32.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    )
    lib.greedy_head_f32.restype = None
    lib.greedy_head_f32.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_int64]
        + [ctypes.c_void_p] * 5 + [ctypes.c_int]
    )
    lib.rms_norm_f32.restype = None
    lib.rms_norm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    return lib


# Full-precision weights the fp32 kernels read as they are (gemm.c: a bf16 weight widens by a shift).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _bf16(t) -> int:
    """The kernels' type flag for a full-precision tensor or packed weight: 1 for bf16, 0 for fp32."""
    return int(stored(t).dtype == torch.bfloat16)


def _rows(x: torch.Tensor) -> torch.Tensor:
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
    x2, (n, k) = _rows(x), qweight.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.int8_gemm_f32(
        x2.data_ptr(), qweight.data_ptr(), scale.data_ptr(), y.data_ptr(),
        x2.shape[0], n, k, x2.stride(0), n, None if norm_weight is None else norm_weight.data_ptr(), eps,
        torch.get_num_threads(),
    )
    return _shaped(y, x)


def linear_f32(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 `x [..., K]` times `weight [N, K]`, fp32 or bf16 (see WEIGHT_DTYPES), summed in fp32."""
    x2, (n, k) = _rows(x), weight.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.gemm_f32(
        x2.data_ptr(), weight.data_ptr(), _bf16(weight), y.data_ptr(), x2.shape[0], n, k,
        x2.stride(0), n, torch.get_num_threads(),
    )
    return _shaped(y, x)


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
    lib.pack_panels(weight.data_ptr(), tail.data_ptr(), n, k, _bf16(weight), torch.get_num_threads())
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
    lib.pack_panels(weight.data_ptr(), None, experts * n, k, _bf16(weight), torch.get_num_threads())
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


def linear_packed(lib: ctypes.CDLL, x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """fp32 `x [..., K]` times a packed weight: `[..., out_features]` fp32."""
    x2, n = _rows(x), weight.out_features
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        lib.gemm_f32_packed(
            x2.data_ptr(), weight.panels.data_ptr(), weight.tail.data_ptr(), _bf16(weight.panels),
            y.data_ptr(),
            x2.shape[0], n, weight.in_features, x2.stride(0), n, torch.get_num_threads(),
        )
    return _shaped(y, x)


def moe(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, D] fp32
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    w13: torch.Tensor, s13: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None,
) -> torch.Tensor:
    """All routed experts of a layer, grouping and weighted sum included, in one native call.
    Weights are int8 with per-row scales, or fp32 or bf16 with both scales None, `[E, N, K]` or as
    pack_experts left them."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape[0], expert_rows(w13), x.shape[-1]
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    lib.moe_f32(
        x.data_ptr(), out.data_ptr(), ids.data_ptr(), weights.data_ptr(), num_tokens, top_k, num_experts,
        w13.data_ptr(), None if s13 is None else s13.data_ptr(), w2.data_ptr(), None if s2 is None else s2.data_ptr(),
        _bf16(w13), packed_flags(w13, w2), hidden, two_inter // 2, torch.get_num_threads(),
    )
    return out


def mla_decode(
    lib: ctypes.CDLL,
    q_nope: torch.Tensor,  # [B, H, Dn] fp32
    q_pe: torch.Tensor,  # [B, H, P] fp32, roped
    w_uk: torch.Tensor,  # [H, Dn, R] fp32 or bf16
    w_uv: torch.Tensor,  # [H, Dv, R], the same dtype
    cache: torch.Tensor,  # [num_blocks, block_size, R + P] fp32 or bf16
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    seq_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode for one query token per sequence: `[B, H, Dv]` fp32."""
    batch, heads, nope = q_nope.shape
    _, value, rank = w_uv.shape
    rope = q_pe.shape[-1]
    if q_nope.stride(-1) != 1:
        q_nope = q_nope.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    tables = block_tables.contiguous()
    lens = seq_lens.contiguous()
    scratch = torch.empty(2 * batch * heads * rank, dtype=torch.float32)  # absorbed q, then attended latent
    out = torch.empty(batch, heads, value, dtype=torch.float32)
    lib.mla_decode_f32(
        q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1), q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1),
        w_uk.data_ptr(), w_uv.data_ptr(), _bf16(w_uk), cache.data_ptr(),
        _bf16(cache), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        scratch.data_ptr(), scratch.data_ptr() + 4 * batch * heads * rank, out.data_ptr(),
        batch, heads, nope, value, rank, rope, cache.shape[1], scale, torch.get_num_threads(),
    )
    return out


def mla_decode_layer(lib: ctypes.CDLL, h: torch.Tensor, layer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
    """`Platform.mla_decode_layer` in one native call (mla_layer.c): `h [B, D]` contiguous fp32, the
    projections int8 or full precision (fp32 or bf16), the cache fp32 or bf16."""
    tokens, hidden = h.shape
    rank = layer.kv_a_norm.shape[0]
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(h)
    lib.mla_decode_layer_f32(
        h.data_ptr(), out.data_ptr(), tokens, hidden, layer.input_norm.data_ptr(), layer.input_eps,
        _ptr(layer.q_kv_a), _ptr(layer.q_kv_a_scale), layer.q_lora_rank,
        layer.q_a_norm.data_ptr(), layer.q_a_eps, _ptr(layer.q_b), _ptr(layer.q_b_scale),
        layer.kv_a_norm.data_ptr(), layer.kv_a_eps,
        layer.w_uk.data_ptr(), layer.w_uv.data_ptr(), _bf16(layer.w_uk),
        _ptr(layer.o), _ptr(layer.o_scale), _bf16(layer.o), int(isinstance(layer.o, Int8Panels)),
        _tail(layer.q_kv_a), _tail(layer.q_b), _tail(layer.o),
        layer.num_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, rank, layer.scale,
        cos.data_ptr(), sin.data_ptr(), int(interleaved), cache.data_ptr(), _bf16(cache),
        slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), cache.shape[1], torch.get_num_threads(),
    )
    return out


def mla_write_latent(lib, q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping) -> None:
    """`ops.mla_write_latent` in one native call (q's rope dims rotated in place): fp32 inputs, an fp32
    or bf16 cache."""
    tokens, heads, head_dim = q.shape
    rank = norm_weight.shape[0]
    rope = kv_a.shape[-1] - rank
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    lib.mla_write_latent_f32(
        q.data_ptr(), q.stride(0), q.stride(1), heads, head_dim - rope, kv_a.data_ptr(), kv_a.stride(0),
        norm_weight.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(), int(interleaved), cache.data_ptr(),
        _bf16(cache), slots.data_ptr(), tokens, rank, rope, torch.get_num_threads(),
    )


SCORING = {"softmax": 0, "sigmoid": 1}
METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def route_experts(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.route_experts` in one native call: (ids [T, K] int64, weights [T, K] fp32)."""
    x2 = _rows(x)
    tokens, hidden = x2.shape
    experts = weight.shape[0]
    logits = torch.empty(tokens, experts, dtype=torch.float32)
    ids = torch.empty(tokens, routing.top_k, dtype=torch.int64)
    weights = torch.empty(tokens, routing.top_k, dtype=torch.float32)
    lib.moe_route_f32(
        x2.data_ptr(), x2.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(), tokens, hidden, experts,
        SCORING[routing.scoring], METHODS[routing.method], routing.n_group, routing.topk_group, routing.top_k,
        int(routing.norm_topk_prob), routing.scaling, logits.data_ptr(), ids.data_ptr(), weights.data_ptr(),
        torch.get_num_threads(),
    )
    return ids, weights


def moe_routed(
    lib: ctypes.CDLL, x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor | None, routing, num_shared: int,
    w13: torch.Tensor, s13: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0, add_input: bool = False,
) -> torch.Tensor:
    """The MoE block in one native call (moe_route.c): `[T, D]` fp32 `(x if add_input else 0) +
    MoE(rms_norm(x) if norm_weight is given else x)`."""
    x = x.contiguous()
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    lib.moe_routed_f32(
        x.data_ptr(), out.data_ptr(), tokens, hidden, None if norm_weight is None else norm_weight.data_ptr(), eps,
        int(add_input), router.data_ptr(), None if bias is None else bias.data_ptr(),
        router.shape[0], SCORING[routing.scoring], METHODS[routing.method], routing.n_group, routing.topk_group,
        routing.top_k, int(routing.norm_topk_prob), routing.scaling, num_shared,
        w13.data_ptr(), None if s13 is None else s13.data_ptr(), w2.data_ptr(), None if s2 is None else s2.data_ptr(),
        _bf16(w13), packed_flags(w13, w2), expert_rows(w13) // 2, torch.get_num_threads(),
    )
    return out


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.float32)
    lib.rms_norm_f32(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), x2.shape[0], x2.shape[1], eps, torch.get_num_threads())
    return _shaped(out, x)


def argmax_rows(lib: ctypes.CDLL, logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for `[B, V]` fp32 logits with unit column stride: int64 `[B]`."""
    rows, cols = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    lib.argmax_rows_f32(logits.data_ptr(), logits.stride(0), rows, cols, out.data_ptr(), torch.get_num_threads())
    return out


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


def int8_linear_panels(lib: ctypes.CDLL, x: torch.Tensor, weight: Int8Panels, scale: torch.Tensor) -> torch.Tensor:
    """fp32 `x [..., K]` times an int8 weight in panels with fp32 per-row `scale [N]`, each row of x
    rounded to int16 first (gemm_int8_panels.c)."""
    x2, n = _rows(x), weight.out_features
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    if x2.shape[0]:
        lib.int8_gemm_panels_f32(
            x2.data_ptr(), x2.stride(0), x2.shape[0], weight.in_features, weight.panels.data_ptr(),
            scale.contiguous().data_ptr(), n, y.data_ptr(), n, torch.get_num_threads(),
        )
    return _shaped(y, x)


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
            weight.tail.data_ptr(), _bf16(weight.panels), weight.out_features, screen.q.panels.data_ptr(),
            screen.scale.data_ptr(), screen.dw.data_ptr(), screen.g.data_ptr(), out.data_ptr(),
            torch.get_num_threads(),
        )
    return out


class DecodeLayerArgs(ctypes.Structure):
    """decode_stack.c's DecodeLayer: the same fields, in the same order and C types."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p), ("input_eps", ctypes.c_float),
        ("q_kv_a", ctypes.c_void_p), ("q_kv_a_scale", ctypes.c_void_p), ("q_lora", ctypes.c_int64),
        ("q_a_norm", ctypes.c_void_p), ("q_a_eps", ctypes.c_float),
        ("q_b", ctypes.c_void_p), ("q_b_scale", ctypes.c_void_p),
        ("kv_a_norm", ctypes.c_void_p), ("kv_a_eps", ctypes.c_float),
        ("w_uk", ctypes.c_void_p), ("w_uv", ctypes.c_void_p), ("w_bf16", ctypes.c_int),
        ("o", ctypes.c_void_p), ("o_scale", ctypes.c_void_p), ("proj_bf16", ctypes.c_int), ("int8_panels", ctypes.c_int),
        ("q_kv_a_tail", ctypes.c_void_p), ("q_b_tail", ctypes.c_void_p), ("o_tail", ctypes.c_void_p),
        ("heads", ctypes.c_int64), ("nope", ctypes.c_int64), ("rope", ctypes.c_int64), ("v_dim", ctypes.c_int64),
        ("rank", ctypes.c_int64), ("scale", ctypes.c_float),
        ("ffn_norm", ctypes.c_void_p), ("ffn_eps", ctypes.c_float),
        ("router", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("experts", ctypes.c_int64),
        ("scoring", ctypes.c_int), ("method", ctypes.c_int),
        ("n_group", ctypes.c_int64), ("topk_group", ctypes.c_int64), ("top_k", ctypes.c_int64),
        ("norm_topk", ctypes.c_int), ("scaling", ctypes.c_float), ("shared", ctypes.c_int64),
        ("w13", ctypes.c_void_p), ("s13", ctypes.c_void_p), ("w2", ctypes.c_void_p), ("s2", ctypes.c_void_p),
        ("experts_bf16", ctypes.c_int), ("experts_packed", ctypes.c_int), ("inter", ctypes.c_int64),
    ]


def _ptr(t: "torch.Tensor | PackedWeight | Int8Panels | None") -> int | None:
    return None if t is None else stored(t).data_ptr()


def _tail(w) -> int | None:
    """A packed projection's tail panel, which also tells the kernels it is packed; None for a row-major one."""
    return w.tail.data_ptr() if isinstance(w, PackedWeight) else None


def stored(w: "torch.Tensor | PackedWeight | Int8Panels") -> torch.Tensor:
    """The tensor that holds a projection's values: a packed one's panels, else the weight itself."""
    return w.panels if isinstance(w, (PackedWeight, Int8Panels)) else w


# what a block without a router (a dense MLP) passes for routing: no routed experts
_NO_ROUTING = Routing(top_k=0)


def decode_stack_table(stack) -> ctypes.Array:
    """The per-layer arguments of decode_stack_f32 for an `ops.DecodeStack`, built once: they point
    into the model's weights, which stay where they are."""
    rows = []
    for layer in stack.layers:
        a, f = layer.attention, layer.ffn
        r = f.routing or _NO_ROUTING
        rows.append(DecodeLayerArgs(
            _ptr(a.input_norm), a.input_eps, _ptr(a.q_kv_a), _ptr(a.q_kv_a_scale), a.q_lora_rank,
            _ptr(a.q_a_norm), a.q_a_eps, _ptr(a.q_b), _ptr(a.q_b_scale), _ptr(a.kv_a_norm), a.kv_a_eps,
            _ptr(a.w_uk), _ptr(a.w_uv), _bf16(a.w_uk), _ptr(a.o), _ptr(a.o_scale),
            _bf16(a.o), int(isinstance(a.o, Int8Panels)), _tail(a.q_kv_a), _tail(a.q_b), _tail(a.o),
            a.num_heads, a.nope_dim, a.rope_dim, a.v_dim, a.kv_a_norm.shape[0], a.scale,
            _ptr(f.norm), f.eps, _ptr(f.router), _ptr(f.bias), 0 if f.router is None else f.router.shape[0],
            SCORING[r.scoring], METHODS[r.method], r.n_group, r.topk_group, r.top_k, int(r.norm_topk_prob), r.scaling,
            f.num_shared, _ptr(f.w13), _ptr(f.w13_scale), _ptr(f.w2), _ptr(f.w2_scale), _bf16(f.w13),
            packed_flags(f.w13, f.w2), expert_rows(f.w13) // 2,
        ))
    return (DecodeLayerArgs * len(rows))(*rows)


def decode_stack(lib: ctypes.CDLL, h: torch.Tensor, table: ctypes.Array, cos, sin, interleaved, caches, slot_mapping, block_tables, seq_lens) -> torch.Tensor:
    """`Platform.decode_layers` in one native call (decode_stack.c): `h [B, D]` contiguous fp32."""
    tokens, hidden = h.shape
    cos, sin, slots = cos.contiguous(), sin.contiguous(), slot_mapping.contiguous()
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    cache_ptrs = (ctypes.c_void_p * len(caches))(*[c.data_ptr() for c in caches])
    out = torch.empty_like(h)
    lib.decode_stack_f32(
        table, len(table), h.data_ptr(), out.data_ptr(), tokens, hidden, cos.data_ptr(), sin.data_ptr(), int(interleaved),
        cache_ptrs, _bf16(caches[0]), slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(), caches[0].shape[1],
        torch.get_num_threads(),
    )
    return out
