"""The host allocator helpers: huge pages change where memory is mapped from, never what it holds."""

import torch

from zizhu.host_memory import HUGE_PAGE, back_with_huge_pages


def _huge_kb(start: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [start, end) in this process, in kB."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(v, 16) for v in first.split("-"))
                inside = lo < end and hi > start
            elif inside and first == "AnonHugePages:":
                total += int(line.split()[1])
    return total


def test_huge_pages_keep_address_and_contents():
    """Collapsing a written tensor's pages keeps its address and every value; where the kernel
    supports it (Linux 6.1+, transparent huge pages not off), the range is then on 2 MB pages."""
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(5 * HUGE_PAGE // 4, generator=g)  # 5 huge pages' worth of fp32
    small = torch.randn(1000, generator=g)  # under one huge page: left alone
    before, before_small = tensor.clone(), small.clone()
    address = tensor.data_ptr()
    moved = back_with_huge_pages([tensor, small])
    assert tensor.data_ptr() == address
    assert torch.equal(tensor, before) and torch.equal(small, before_small)
    assert 0 <= moved <= tensor.numel() * 4 and moved % HUGE_PAGE == 0
    if moved:
        assert moved >= 3 * HUGE_PAGE  # every whole aligned 2 MB inside the tensor
        assert _huge_kb(address, address + tensor.numel() * 4) * 1024 >= moved
