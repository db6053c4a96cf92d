"""Native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Only plain C with OpenMP: no torch headers, so a build takes about a second. When no compiler or
no AVX2 is available, `load()` returns None and the platform keeps the reference ops.
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

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemm.c")


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
    source = SOURCE.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256(source + " ".join(flags).encode() + os.uname().machine.encode()).hexdigest()[:16]
    target = _cache_dir() / f"int8_gemm-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                logger.info("native int8 kernel not built (%s): using reference int8 matmul", result.stderr.strip()[:200])
                return None
            os.replace(built, target)  # atomic, so concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    lib.int8_gemm_f32.restype = None
    lib.int8_gemm_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.int8_moe_f32.restype = None
    lib.int8_moe_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    return lib


def int8_linear(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 `x [..., K]` times int8 `qweight [N, K]` with fp32 per-row `scale [N]`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = qweight.shape
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.int8_gemm_f32(
        x2.data_ptr(), qweight.data_ptr(), scale.data_ptr(), y.data_ptr(),
        x2.shape[0], n, k, x2.stride(0), n, torch.get_num_threads(),
    )
    return y.view(*shape[:-1], n)


def int8_moe(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, D] fp32
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
) -> torch.Tensor:
    """All routed experts of a layer in one native call; tokens are grouped by expert first."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(flat, minlength=num_experts), 0, out=offsets[1:])
    xs = x.index_select(0, token_of).contiguous()
    ys = torch.empty_like(xs)
    h = torch.empty(xs.shape[0], two_inter, dtype=torch.float32)
    lib.int8_moe_f32(
        xs.data_ptr(), ys.data_ptr(), h.data_ptr(), offsets.data_ptr(), num_experts,
        w13.data_ptr(), s13.data_ptr(), w2.data_ptr(), s2.data_ptr(), hidden, two_inter // 2, torch.get_num_threads(),
    )
    ys.mul_(topk_weights.reshape(-1)[order].to(torch.float32)[:, None])
    return torch.zeros_like(x).index_add_(0, token_of, ys)
