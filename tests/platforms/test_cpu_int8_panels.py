"""The CPU platform's int8 panels (gemm_int8_panels.c), the layout prepare_linear gives every int8
weight: the same products as the row-major int8 kernel at every tiling."""

import pytest
import torch

from tests.platforms.test_conformance import assert_int8_close
from zizhu.layers.quant import quantize_int8_rows
from zizhu.platforms import cpu as cpu_platform
from zizhu.platforms import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no native CPU kernels here")


@pytest.fixture
def platform():
    return cpu_platform.CpuPlatform()


@pytest.mark.parametrize(
    "rows,n,k", [(1, 40, 24), (5, 37, 33), (6, 16, 8), (11, 1003, 256), (13, 50, 1), (70, 64, 1024), (7, 48, 2112)]
)
def test_int8_panels_match_the_product(platform, rows, n, k):
    """Every row tile (1-6 rows, five as four and one), partial panels, odd K (a zero-padded pair),
    K past one part of 512 (2,112: five parts), and strided rows of x."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, k + 3, generator=g)[:, 1 : k + 1]
    q, scale = quantize_int8_rows(torch.randn(n, k, generator=g))
    prepared = platform.prepare_linear(q)
    assert isinstance(prepared, cpu_kernels.Int8Panels)
    got = platform.int8_linear(x, prepared, scale)
    assert_int8_close(got, x, q, scale)
    if k % 32 == 0:  # the row-major kernel sums elements past whole chunks of 32 unrounded
        rowwise = cpu_kernels.int8_linear(cpu_kernels.load(), x, q, scale)
        torch.testing.assert_close(got, rowwise, atol=1e-5, rtol=1e-5)  # the same integer sums


def test_int8_panels_non_finite_rows(platform):
    """A row with a NaN or an inf gives NaN outputs, as the fp32 product would; the others are untouched."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 64, generator=g)
    x[2, 5], x[6, 0] = float("nan"), float("inf")
    q, scale = quantize_int8_rows(torch.randn(100, 64, generator=g))
    got = platform.int8_linear(x, platform.prepare_linear(q), scale)
    assert got[2].isnan().all() and got[6].isnan().all()
    finite = [0, 1, 3, 4, 5, 7]
    assert_int8_close(got[finite], x[finite], q, scale)
