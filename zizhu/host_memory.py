"""How host memory is kept, returned and paged: glibc malloc's thresholds, its trim, and Linux's
transparent huge pages. Under another C library or OS these calls do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
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


# Linux madvise advice values, and the transparent huge page size on x86-64 and most arm64 kernels
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
HUGE_PAGE = 2 << 20


def back_with_huge_pages(tensors) -> int:
    """Move the pages of these (already written) CPU tensors into transparent 2 MB pages, in place:
    same addresses, same contents. Returns the bytes moved; 0 where the kernel cannot (huge pages
    off, kernels before 6.1, another OS).

    Decode streams every weight once per step, and with 4 KB pages that is a TLB miss and a halt of
    the hardware prefetcher at every 4 KB (a weight row or four). Most kernels leave huge pages to
    processes that ask (transparent_hugepage = madvise), and memory already written only becomes
    huge when asked to collapse. The small benchmark model in int8, batch-1 step, median of 200
    steps in four alternating pairs of processes: 20.6 / 20.6 / 16.8 / 20.6 ms on 4 KB pages, 19.1 /
    18.6 / 18.1 / 17.5 ms on 2 MB pages, for 2.6 s of collapsing 1.2 GB at load."""
    madvise = _glibc("madvise")
    if madvise is None or not sys.platform.startswith("linux"):  # the advice numbers are Linux's
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved = 0
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last <= first:
            continue
        if madvise(first, last - first, _MADV_HUGEPAGE) != 0 or madvise(first, last - first, _MADV_COLLAPSE) != 0:
            return moved  # unsupported here: later tensors would fail the same way
        moved += last - first
    return moved
