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
from functools import lru_cache
from pathlib import Path

# The Python side of each kernel, by what it drives; imported here so callers say cpu_kernels.<name>.
from zizhu.platforms.cpu_kernels.layout import (
    Int8Panels, PANEL, PackedWeight, WEIGHT_DTYPES, can_pack, can_pack_experts, can_pack_int8_experts,
    expert_rows, is_packed_experts, pack_experts, pack_int8_experts, pack_int8_panels, pack_weight,
    packed_flags, stored,
)
from zizhu.platforms.cpu_kernels.products import (
    argmax_rows, int8_linear, int8_linear_panels, linear_f32, linear_packed, rms_norm,
)
from zizhu.platforms.cpu_kernels.greedy import (
    GreedyScreen, SCREEN_CHUNK, greedy_head, greedy_screen,
)
from zizhu.platforms.cpu_kernels.layers import (
    DecodeLayerArgs, METHODS, SCORING, decode_stack, decode_stack_table, mla_decode, mla_decode_layer,
    mla_write_latent, moe, moe_routed, route_experts,
)

__all__ = [  # the Python side, re-exported, and the library
    "Int8Panels", "PANEL", "PackedWeight", "WEIGHT_DTYPES", "can_pack", "can_pack_experts",
    "can_pack_int8_experts", "expert_rows", "is_packed_experts", "pack_experts", "pack_int8_experts",
    "pack_int8_panels", "pack_weight", "packed_flags", "stored", "argmax_rows", "int8_linear",
    "int8_linear_panels", "linear_f32", "linear_packed", "rms_norm", "GreedyScreen", "SCREEN_CHUNK",
    "greedy_head", "greedy_screen", "DecodeLayerArgs", "METHODS", "SCORING", "decode_stack",
    "decode_stack_table", "mla_decode", "mla_decode_layer", "mla_write_latent", "moe", "moe_routed",
    "route_experts", "load",
]

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

