"""How the host's C allocator (glibc malloc) keeps and returns freed memory. Under another C
library these calls do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

# glibc's mallopt parameters, and the block size up to which freed memory stays in the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCK_LIMIT = 1 << 30


@lru_cache(maxsize=None)
def _glibc(function: str):
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks for the next step rather than hand them back to the OS.

    By default glibc serves each block above 32 MB (the logits of a many-sequence step, a prefill's
    activations and expert scratch) from a fresh mmap and unmaps it when freed, and trims the heap
    as it shrinks, so every step pays a page fault for each 4 KB it writes: on the 2-core benchmark
    machine, allocating and filling 42 MB ten times took 224-241 ms with 107,000 faults, and 26 ms
    once the blocks stayed in the heap. With both thresholds raised, freed blocks are reused, as a
    caching allocator would reuse them; memory stays at a step's high-water mark."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
        mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCK_LIMIT)


def release_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS now. glibc keeps freed heap memory for reuse,
    and loading frees a layer's worth of full-precision weights at every step (conversions, fused
    and quantized copies): loading the small benchmark model with int8 quantization grew RSS by
    about twice the int8 size of each layer, 1.3 to 2.5 GB over its 12 layers, without this."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)
