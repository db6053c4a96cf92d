"""Conformance: a platform's hot ops must match the reference ops in zizhu.ops.

A vendor runs this file with ZIZHU_PLATFORM=<name> to prove a new platform; by default it checks
the selected platform (CPU here), and it always checks the seam itself: selection and plugins.
"""

import dataclasses

import pytest
import torch

from zizhu import ops
from zizhu.errors import ConfigError
from zizhu.layers.quant import quantize_int8_rows
from zizhu.platforms import Platform, cpu_kernels, get_platform


@pytest.fixture(scope="module")
def platform() -> Platform:
    return get_platform()


def _tolerance(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_mla_decode(platform, dtype):
    g = torch.Generator().manual_seed(0)
    heads, rank, rope, bs = 4, 32, 8, 4
    cache = torch.randn(12, bs, rank + rope, generator=g).to(dtype).to(platform.device)
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11]], device=platform.device)
    seq_lens = torch.tensor([9, 16], device=platform.device)
    q = torch.randn(2, heads, rank + rope, generator=g).to(dtype).to(platform.device)
    got = platform.paged_mla_decode(q, cache, tables, seq_lens, rank, 0.3)
    want = ops.paged_mla_decode(q.cpu(), cache.cpu(), tables.cpu(), seq_lens.cpu(), rank, 0.3)
    torch.testing.assert_close(got.cpu().float(), want.float(), **_tolerance(dtype))
    # explicit formula for one sequence, independent of the reference's batching
    ctx = cache.cpu()[tables.cpu()[0]].reshape(-1, rank + rope)[:9].float()
    p = torch.softmax(q.cpu()[0].float() @ ctx.T * 0.3, dim=-1)
    torch.testing.assert_close(got.cpu()[0].float(), p @ ctx[:, :rank], **_tolerance(dtype))


@pytest.mark.parametrize("batch", [1, 3, 9])
@pytest.mark.parametrize("heads", [4, 6])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_absorbed(platform, batch, heads, narrow, dtype):
    """Absorbed decode equals attention with K/V decompressed by kv_b_proj, per sequence; also with
    W_UK / W_UV in the platform's own form for values bf16 holds exactly (prepare_absorbed), head
    counts that are and are not multiples of four, and a bf16 model's cache and queries (the
    result is fp32 either way, from the same values)."""
    g = torch.Generator().manual_seed(5)
    nope, rope, v, rank, bs = 12, 8, 10, 40, 4
    cache = torch.randn(40, bs, rank + rope, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(batch)])
    seq_lens = torch.randint(1, 6 * bs + 1, (batch,), generator=g)
    q = torch.randn(batch, heads, nope + rope, generator=g).to(dtype)  # nope and rope parts are strided views of it
    w_uk = torch.randn(heads, nope, rank, generator=g) * 0.2
    w_uv = torch.randn(heads, v, rank, generator=g) * 0.2
    absorbed_uk, absorbed_uv = w_uk, w_uv
    if narrow:
        w_uk, w_uv = w_uk.bfloat16().float(), w_uv.bfloat16().float()
        absorbed_uk, absorbed_uv = platform.prepare_absorbed(w_uk.clone()), platform.prepare_absorbed(w_uv.clone())
    dev = platform.device
    got = platform.mla_decode(
        q[..., :nope].to(dev), q[..., nope:].to(dev), absorbed_uk.to(dev), absorbed_uv.to(dev), cache.to(dev),
        tables.to(dev), seq_lens.to(dev), 0.3,
    ).cpu()
    assert got.shape == (batch, heads, v) and got.dtype == torch.float32
    cache, q = cache.float(), q.float()
    for b in range(batch):
        ctx = cache[tables[b]].reshape(-1, rank + rope)[: seq_lens[b]]
        k_nope = torch.einsum("lr,hnr->lhn", ctx[:, :rank], w_uk)
        values = torch.einsum("lr,hvr->lhv", ctx[:, :rank], w_uv)
        scores = (torch.einsum("hn,lhn->hl", q[b, :, :nope], k_nope) + q[b, :, nope:] @ ctx[:, rank:].T) * 0.3
        want = torch.einsum("hl,lhv->hv", torch.softmax(scores, dim=-1), values)
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


def test_mla_prefill_with_cached_prefix(platform):
    g = torch.Generator().manual_seed(1)
    heads, nope, rope, v, rank = 4, 16, 8, 16, 32
    context = torch.randn(10, rank + rope, generator=g)
    kv_b = torch.randn(heads * (nope + v), rank, generator=g) * 0.2
    q = torch.randn(3, heads, nope + rope, generator=g)  # the last 3 positions of a 10-token context
    got = platform.mla_prefill(q.to(platform.device), context.to(platform.device), kv_b.to(platform.device), heads, nope, v, 0.25)
    kv = (context[:, :rank] @ kv_b.T).view(10, heads, nope + v)
    k = torch.cat([kv[..., :nope], context[:, None, rank:].expand(10, heads, rope)], dim=-1)
    for i in range(3):
        pos = 7 + i
        s = torch.einsum("hd,lhd->hl", q[i], k[: pos + 1]) * 0.25
        want = torch.einsum("hl,lhv->hv", torch.softmax(s, dim=-1), kv[: pos + 1, :, nope:])
        torch.testing.assert_close(got[i].cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_q,length", [(6, 6), (3, 10)])
def test_mla_prefill_grouped(platform, num_q, length):
    """Sequences of the same lengths in one call (a leading group dim) answer as they do one by one:
    new prompts (causal) and chunks after a cached prefix."""
    g = torch.Generator().manual_seed(2)
    heads, nope, rope, v, rank, groups = 4, 16, 8, 12, 32, 5
    context = torch.randn(groups, length, rank + rope, generator=g)
    kv_b = torch.randn(heads * (nope + v), rank, generator=g) * 0.2
    q = torch.randn(groups, num_q, heads, nope + rope, generator=g)
    dev = platform.device
    got = platform.mla_prefill(q.to(dev), context.to(dev), kv_b.to(dev), heads, nope, v, 0.25).cpu()
    assert got.shape == (groups, num_q, heads, v)
    for i in range(groups):
        one = ops.mla_prefill(q[i], context[i], kv_b, heads, nope, v, 0.25)
        torch.testing.assert_close(got[i], one, atol=1e-5, rtol=1e-5)


def test_mla_prefill_bf16(platform):
    """A bf16 model's prefill: bf16 out, as close to the fp32 answer on the same (bf16) inputs as a bf16
    computation with fp32 sums gets (a platform may compute wider, as the CPU does)."""
    g = torch.Generator().manual_seed(3)
    heads, nope, rope, v, rank, groups, length = 4, 16, 8, 12, 32, 3, 9
    context = torch.randn(groups, length, rank + rope, generator=g).bfloat16()
    kv_b = (torch.randn(heads * (nope + v), rank, generator=g) * 0.2).bfloat16()
    q = torch.randn(groups, length, heads, nope + rope, generator=g).bfloat16()
    dev = platform.device
    got = platform.mla_prefill(q.to(dev), context.to(dev), kv_b.to(dev), heads, nope, v, 0.25).cpu()
    assert got.dtype == torch.bfloat16 and got.shape == (groups, length, heads, v)
    want = ops.mla_prefill(q.float(), context.float(), kv_b.float(), heads, nope, v, 0.25)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("tokens", [1, 7, 37, 200])
def test_moe_experts(platform, tokens):
    """fp32 experts against the formula; token counts cover one token, tile tails, full tiles and
    experts with more rows than a native kernel's row block (64)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 16, generator=g)
    w13 = torch.randn(5, 2 * 8, 16, generator=g) * 0.3
    w2 = torch.randn(5, 16, 8, generator=g) * 0.3
    ids = torch.randint(0, 5, (tokens, 2), generator=g)
    ids[:, 1] = (ids[:, 0] + 1) % 5
    weights = torch.rand(tokens, 2, generator=g)
    got = platform.moe_experts(x, ids, weights, w13, w2)
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(2):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_rms_norm_and_cache_write(platform):
    x = torch.randn(3, 8)
    w = torch.rand(8)
    want = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(platform.rms_norm(x, w, 1e-6).cpu(), want)
    wide = torch.randn(2, 5, 300)  # a strided slice, as the split of c_kv from k_pe gives
    part, w = wide[..., :257], torch.rand(257)
    want = w * part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(platform.rms_norm(part.to(platform.device), w.to(platform.device), 1e-6).cpu(), want)
    cache = platform.allocate_kv_cache(1, 4, 2, 8, torch.float32)[0]
    platform.write_kv_cache(cache, torch.tensor([5, 0]), x[:2])
    torch.testing.assert_close(cache[2, 1].cpu(), x[0])
    torch.testing.assert_close(cache[0, 0].cpu(), x[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_write_latent(platform, dtype, interleaved):
    """The new tokens' latents land at their slots, normalised and rotated, and q's rope dims are
    rotated in place: fp32, and a bf16 model's rows and cache (one rounding to bf16 allowed)."""
    g = torch.Generator().manual_seed(14)
    tokens, heads, nope, rope, rank = 3, 2, 6, 8, 20
    q = torch.randn(tokens, heads, nope + rope, generator=g).to(dtype)
    kv_a = torch.randn(tokens, rank + rope, generator=g).to(dtype)
    norm = (torch.rand(rank, generator=g) + 0.5).to(dtype)
    angles = torch.rand(tokens, rope // 2, generator=g) * 3
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 0, 9])
    want_q, want_cache = q.float().clone(), torch.zeros(3, 4, rank + rope)
    ops.mla_write_latent(want_q, kv_a.float(), norm.float(), 1e-6, cos, sin, interleaved, want_cache, slots)
    dev = platform.device
    got_q, cache = q.clone().to(dev), torch.zeros(3, 4, rank + rope, dtype=dtype, device=dev)
    platform.mla_write_latent(got_q, kv_a.to(dev), norm.to(dev), 1e-6, cos.to(dev), sin.to(dev), interleaved, cache, slots.to(dev))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got_q.cpu().float(), want_q, **tol)
    torch.testing.assert_close(cache.cpu().float(), want_cache, **tol)
    assert cache.dtype == dtype and got_q.dtype == dtype


def test_platform_selection(monkeypatch):
    monkeypatch.setenv("ZIZHU_PLATFORM", "cpu")
    assert get_platform().name == "cpu"
    with pytest.raises(ConfigError, match="unknown platform"):
        get_platform("quantum-abacus")


def test_plugin_platform_from_entry_points(monkeypatch):
    """A third-party platform registered under `zizhu.platforms` is found and preferred when available."""
    import zizhu.platforms as platforms

    class FakeChip(Platform):
        name = "fakechip"

        @classmethod
        def is_available(cls):
            return True

    class EntryPoint:
        name = "fakechip"

        def load(self):
            return FakeChip

    monkeypatch.delenv("ZIZHU_PLATFORM", raising=False)
    monkeypatch.setattr(platforms, "entry_points", lambda group: [EntryPoint()] if group == "zizhu.platforms" else [])
    assert isinstance(get_platform(), FakeChip)
    assert "fakechip" in platforms.available_platforms()


def assert_int8_close(got: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """`got` is x @ (q * scale)^T up to fp32 rounding plus what rounding each row of x to int16
    (Platform.int8_linear) may add: max|x_row| / 65534 per element, times the column's sum of |w|."""
    w = q.float() * scale[:, None]
    want = x @ w.T
    bound = x.abs().amax(dim=-1, keepdim=True) / 65534 * w.abs().sum(dim=-1)
    excess = (got.cpu() - want).abs() - (1e-5 + 1e-4 * want.abs() + bound)
    assert excess.max() <= 0, f"int8 product off by {excess.max().item():.3g} beyond the int16 rounding bound"


@pytest.mark.parametrize("rows,k", [(1, 24), (5, 27), (11, 64), (40, 33), (6, 2112)])
def test_int8_linear(platform, rows, k):
    """Odd widths and row and output counts cover the vector tails and the tiling of native kernels;
    2,112 columns, integer sums past 2,048 products (where an int32 sum of int16 x int8 could
    overflow)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, k, generator=g)
    q = torch.randint(-127, 128, (13, k), generator=g, dtype=torch.int8)
    scale = torch.rand(13, generator=g) * 0.01
    assert_int8_close(platform.int8_linear(x, q, scale), x, q, scale)
    # a strided view of the activations, as a split of a wider projection produces
    wide = torch.randn(rows, 2 * k, generator=g)
    assert_int8_close(platform.int8_linear(wide[:, :k], q, scale), wide[:, :k], q, scale)
    # the largest magnitudes int8 and int16 hold, in every product
    extreme = torch.full((rows, k), 3.0)
    extreme[:, 1::2] = -3.0
    full = torch.full((13, k), 127, dtype=torch.int8)
    full[:, 1::2] = -127
    assert_int8_close(platform.int8_linear(extreme, full, scale), extreme, full, scale)


@pytest.mark.parametrize("rows,k", [(1, 64), (5, 72), (9, 1024)])
def test_rms_norm_int8_linear(platform, rows, k):
    """The fused norm and int8 projection equals the two ops in turn, on strided rows too."""
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(rows, k + 16, generator=g) * 3
    x = wide[:, 3 : 3 + k]
    norm = torch.rand(k, generator=g) + 0.5
    q = torch.randint(-127, 128, (20, k), generator=g, dtype=torch.int8)
    scale = torch.rand(20, generator=g) * 0.01
    dev = platform.device
    got = platform.rms_norm_int8_linear(x.to(dev), norm.to(dev), 1e-6, q.to(dev), scale.to(dev)).cpu()
    separate = platform.int8_linear(platform.rms_norm(x.to(dev), norm.to(dev), 1e-6), q.to(dev), scale.to(dev)).cpu()
    torch.testing.assert_close(got, separate, atol=1e-6, rtol=1e-6)
    assert_int8_close(got, torch.nn.functional.rms_norm(x, (k,), norm, 1e-6), q, scale)


def test_int8_linear_non_finite(platform):
    """A NaN or inf in an activation row spoils that row's outputs, as in the fp32 product, and no other row."""
    x = torch.randn(3, 64)
    x[0, 5], x[2, 7] = float("nan"), float("inf")
    q = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    got = platform.int8_linear(x, q, torch.full((4,), 0.01)).cpu()
    assert not got[0].isfinite().any() and not got[2].isfinite().any()
    assert got[1].isfinite().all()


def round_rows_int16(x: torch.Tensor) -> torch.Tensor:
    """x with each row's whole chunks of 32 on the int16 grid of that row (largest |x| -> 32767), as
    a platform may round activations for int8 weights (Platform.int8_linear)."""
    whole = x.shape[-1] // 32 * 32
    amax = x.abs().amax(dim=-1, keepdim=True)
    grid = torch.round(x[..., :whole] * (32767 / amax)) * (amax / 32767)
    return torch.cat([torch.where(amax > 0, grid, 0.0), x[..., whole:]], dim=-1)


@pytest.mark.parametrize("tokens", [1, 6, 37, 150])
@pytest.mark.parametrize("hidden,inter", [(24, 10), (72, 40)])
def test_int8_moe_experts(platform, tokens, hidden, inter):
    """Quantized experts on the platform match the reference ops on the same int8 weights, with
    full-precision activations or with activations rounded to int16 per row (either is allowed)."""
    from zizhu.layers.quant import quantize_int8_rows

    g = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, hidden, generator=g)
    w13, s13 = quantize_int8_rows(torch.randn(6, 2 * inter, hidden, generator=g) * 0.3)
    w2, s2 = quantize_int8_rows(torch.randn(6, hidden, inter, generator=g) * 0.3)
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    got = platform.moe_experts(x, ids, weights, w13, w2, s13, s2).cpu()
    assert_experts_close(got, x, ids, weights, w13, w2, s13, s2)


def assert_experts_close(got, x, ids, weights, w13, w2, s13, s2) -> None:
    """`got` is the reference ops.moe_experts, with full-precision activations or, for int8
    weights, with activations rounded to int16 per row (either is allowed)."""
    exact = ops.moe_experts(x, ids, weights, w13, w2, s13, s2)
    if torch.allclose(got, exact, atol=1e-5, rtol=1e-4):
        return
    assert s13 is not None, f"off by {(got - exact).abs().max():.3g} from the reference"
    rounded = ops.moe_experts(
        x, ids, weights, w13, w2, s13, s2, int8_matmul=lambda a, q, s: ops.int8_linear(round_rows_int16(a), q, s)
    )
    # int16 rounding of the SiLU products flips with the last bit of each, so allow 1e-4 of the largest output
    assert torch.allclose(got, rounded, atol=1e-4 * float(rounded.abs().max()), rtol=1e-4), (
        f"off by {(got - exact).abs().max():.3g} from the reference, {(got - rounded).abs().max():.3g} with int16 activations"
    )


ROUTINGS = [
    ops.Routing(top_k=2),  # V2-Lite: softmax, greedy
    ops.Routing(top_k=3, method="group_limited_greedy", n_group=4, topk_group=2, scaling=16.0),  # V2
    ops.Routing(top_k=4, scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True, scaling=2.5),
    ops.Routing(top_k=3, scoring="sigmoid", method="noaux_tc", norm_topk_prob=True),  # one group
]
ROUTING_IDS = ["greedy", "group_limited", "noaux_tc", "noaux_tc_one_group"]


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("num_shared", [0, 2])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("layer", [False, True], ids=["block", "with-norm-and-residual"])
def test_route_and_run_experts(platform, routing, num_shared, int8, layer):
    """The whole MoE block equals route_experts then moe_experts, the shared experts (stacked after
    the routed ones) appended to every token with weight 1; with a norm weight and add_input, on
    the normalised input and with the input added back (the decoder layer's residual)."""
    from zizhu.layers.quant import quantize_int8_rows

    g = torch.Generator().manual_seed(11)
    tokens, hidden, inter, routed = 7, 64, 40, 8
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(routed, hidden, generator=g) * 0.3
    bias = torch.randn(routed, generator=g) * 0.1 if routing.method == "noaux_tc" else None
    w13 = torch.randn(routed + num_shared, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(routed + num_shared, hidden, inter, generator=g) * 0.2
    s13 = s2 = None
    if int8:
        (w13, s13), (w2, s2) = quantize_int8_rows(w13), quantize_int8_rows(w2)
    norm = torch.rand(hidden, generator=g) + 0.5 if layer else None
    dev = platform.device
    on = lambda t: None if t is None else t.to(dev)  # noqa: E731
    got = platform.route_and_run_experts(
        on(x), on(router), on(bias), routing, num_shared, on(w13), on(w2), on(s13), on(s2), on(norm), 1e-6, layer
    ).cpu()
    h = ops.rms_norm(x, norm, 1e-6) if layer else x
    ids, weights = ops.route_experts(h, router, bias, routing)
    ids = torch.cat([ids, torch.arange(routed, routed + num_shared).expand(tokens, -1)], dim=1)
    weights = torch.cat([weights, torch.ones(tokens, num_shared)], dim=1)
    assert_experts_close(got - x if layer else got, h, ids, weights, w13, w2, s13, s2)


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("tokens", [1, 9])
def test_route_experts(platform, routing, tokens):
    """The same experts (as a set) and weights per token as the reference router."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, 40, generator=g)
    weight = torch.randn(16, 40, generator=g) * 0.3
    bias = torch.randn(16, generator=g) * 0.1 if routing.method == "noaux_tc" else None
    dev = platform.device
    ids, weights = platform.route_experts(x.to(dev), weight.to(dev), None if bias is None else bias.to(dev), routing)
    want_ids, want_weights = ops.route_experts(x, weight, bias, routing)
    order, want_order = ids.cpu().argsort(dim=-1), want_ids.argsort(dim=-1)
    assert torch.equal(ids.cpu().gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.cpu().float().gather(1, order), want_weights.gather(1, want_order), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,k", [(1, 24), (3, 37), (16, 64), (40, 33)])
def test_linear(platform, rows, k):
    """Full-precision projections: odd widths, the few-row native range and beyond it (twice
    `rows` in all), a bias."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, rows, k, generator=g)
    w = torch.randn(11, k, generator=g)
    b = torch.randn(11, generator=g)
    dev = platform.device
    torch.testing.assert_close(platform.linear(x.to(dev), w.to(dev)).cpu(), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(platform.linear(x.to(dev), w.to(dev), b.to(dev)).cpu(), x @ w.T + b, atol=1e-4, rtol=1e-4)


def _bf16_close(got: torch.Tensor, exact: torch.Tensor) -> None:
    """bf16 results against the fp32 product of the same bf16 values: one rounding to bf16 (2^-8
    relative) at the end, or a few along the way as the reference ops round, allowed; summing in
    bf16 over the whole width, or dropping a term, is not."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, atol=2e-2 * float(exact.abs().max()), rtol=1.6e-2)


@pytest.mark.parametrize("rows,k", [(1, 24), (3, 37), (16, 64), (40, 1024), (70, 33)])
def test_bf16_linear(platform, rows, k):
    """A bf16 model's projections (bf16 weights and rows) give the fp32 product of the bf16 values,
    rounded to bf16: the few-row native range and beyond it, odd widths, a bias."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(11, k, generator=g).bfloat16()
    b = torch.randn(11, generator=g).bfloat16()
    dev = platform.device
    exact = x.float() @ w.float().T
    _bf16_close(platform.linear(x.to(dev), w.to(dev)).cpu(), exact)
    _bf16_close(platform.linear(x[None].to(dev), w.to(dev), b.to(dev))[0].cpu(), exact + b.float())


@pytest.mark.parametrize("tokens", [1, 7, 60])
def test_bf16_moe_experts(platform, tokens):
    """bf16 experts on bf16 rows, alone and routed in one call with a shared expert (as a bf16 model
    runs them), against the formula in fp32 on the same bf16 values. 60 tokens x 2 of 3 experts
    puts 40 rows on each, the many-row (panel) path of a native kernel."""
    g = torch.Generator().manual_seed(13)
    hidden, inter, routed = 48, 24, 3
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    w13 = (torch.randn(routed + 1, 2 * inter, hidden, generator=g) * 0.3).bfloat16()
    w2 = (torch.randn(routed + 1, hidden, inter, generator=g) * 0.3).bfloat16()
    router = torch.randn(routed, hidden, generator=g) * 0.3
    routing = ops.Routing(top_k=2)
    ids, weights = ops.route_experts(x.float(), router, None, routing)
    dev = platform.device

    def formula(ids, weights):
        want = torch.zeros(tokens, hidden)
        for t in range(tokens):
            for j in range(ids.shape[1]):
                gate, up = (w13[ids[t, j]].float() @ x[t].float()).chunk(2)
                want[t] += weights[t, j] * (w2[ids[t, j]].float() @ (torch.nn.functional.silu(gate) * up))
        return want

    _bf16_close(platform.moe_experts(x.to(dev), ids.to(dev), weights.to(dev), w13[:routed].to(dev), w2[:routed].to(dev)).cpu(),
                formula(ids, weights))
    got = platform.route_and_run_experts(x.to(dev), router.to(dev), None, routing, 1, w13.to(dev), w2.to(dev)).cpu()
    _bf16_close(got, formula(torch.cat([ids, torch.full((tokens, 1), routed)], 1), torch.cat([weights, torch.ones(tokens, 1)], 1)))


@pytest.mark.parametrize("tokens", [1, 7, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_experts(platform, tokens, dtype):
    """Stacked experts in the platform's own layout (prepare_experts, which may take over their
    storage) give what the [E, N, K] stacks give, alone and routed with a shared expert: few rows
    per expert and, at 60 tokens x 2 of 3 experts, 40 on each."""
    g = torch.Generator().manual_seed(29)
    hidden, inter, routed = 48, 32, 3
    x = torch.randn(tokens, hidden, generator=g)
    w13 = (torch.randn(routed + 1, 2 * inter, hidden, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(routed + 1, hidden, inter, generator=g) * 0.3).to(dtype)
    router = torch.randn(routed, hidden, generator=g) * 0.3
    routing = ops.Routing(top_k=2)
    ids, weights = ops.route_experts(x, router, None, routing)
    dev = platform.device
    on = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    p13, p2 = platform.prepare_experts(w13.clone().to(dev)), platform.prepare_experts(w2.clone().to(dev))
    want = platform.route_and_run_experts(*on(x, router), None, routing, 1, *on(w13, w2)).cpu()
    got = platform.route_and_run_experts(*on(x, router), None, routing, 1, p13, p2).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want = platform.moe_experts(*on(x, ids, weights, w13, w2)).cpu()
    got = platform.moe_experts(*on(x, ids, weights), p13, p2).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 250])
def test_prepared_int8_experts(platform, tokens):
    """int8 stacks with per-row scales in the platform's own layout (prepare_experts, w13 and w2
    together, as Experts.prepare hands them over) give what the [E, N, K] stacks give, alone and
    routed with a shared expert: a row per expert, a few, and at 250 tokens x 2 of 3 experts more
    rows per expert than a kernel may take at once; one row holds a NaN, which stays in its row."""
    g = torch.Generator().manual_seed(37)
    hidden, inter, routed = 512, 40, 3
    x = torch.randn(tokens, hidden, generator=g)
    if tokens > 1:
        x[1, 3] = float("nan")
    (q13, s13), (q2, s2) = (quantize_int8_rows(torch.randn(routed + 1, n, k, generator=g) * 0.3)
                            for n, k in ((2 * inter, hidden), (hidden, inter)))
    router = torch.randn(routed, hidden, generator=g) * 0.3
    routing = ops.Routing(top_k=2)
    ids, weights = ops.route_experts(x.nan_to_num(), router, None, routing)
    dev = platform.device
    on = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    p13, p2 = platform.prepare_experts(q13.clone().to(dev)), platform.prepare_experts(q2.clone().to(dev))
    scales = on(s13, s2)

    def close(got, want):
        # both round each row of x and of the SiLU products to int16; summed in another order, a
        # product may land one int16 step away, ~1.5e-5 of its row's largest value
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4 * float(want.nan_to_num().abs().max()), rtol=1e-4, equal_nan=True)

    close(platform.moe_experts(*on(x, ids, weights), p13, p2, *scales), platform.moe_experts(*on(x, ids, weights, q13, q2), *scales))
    x = x.nan_to_num()
    want = platform.route_and_run_experts(*on(x, router), None, routing, 1, *on(q13, q2), *scales)
    close(platform.route_and_run_experts(*on(x, router), None, routing, 1, p13, p2, *scales), want)


@pytest.mark.parametrize("rows,n,k", [(1, 40, 24), (5, 37, 33), (6, 16, 8), (13, 1003, 256), (70, 50, 1024)])
def test_prepared_linear(platform, rows, n, k):
    """A weight in the platform's own layout (prepare_linear) gives the same product, fp32, bf16 and
    int8: partial panels and row tiles, strided rows, a bias."""
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(rows, k + 5, generator=g)
    x, w, b = wide[:, :k], torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    dev = platform.device
    prepared = platform.prepare_linear(w.clone().to(dev))  # it may take over the weight's storage
    torch.testing.assert_close(platform.linear(x.to(dev), prepared).cpu(), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(platform.linear(x[None].to(dev), prepared, b.to(dev)).cpu(), (x @ w.T + b)[None], atol=1e-4, rtol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()
    prepared = platform.prepare_linear(wb.clone().to(dev))
    _bf16_close(platform.linear(xb.to(dev), prepared, b.bfloat16().to(dev)).cpu(), xb.float() @ wb.float().T + b.bfloat16().float())
    q, scale = quantize_int8_rows(w)
    prepared = platform.prepare_linear(q.clone().to(dev))
    assert_int8_close(platform.int8_linear(x.to(dev), prepared, scale.to(dev)), x, q, scale)


@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 129), (9, 1000), (64, 4099)])
def test_argmax(platform, rows, vocab):
    """Greedy tokens exactly as torch picks them: the first index on ties (a tie planted after the
    maximum and one before it), rows of -inf, a NaN winning its row, and a row view with a stride."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(rows, vocab + 5, generator=g)[:, 2 : vocab + 2]  # rows strided, not contiguous
    top = logits.argmax(dim=-1)
    logits[0, -1] = logits[0].max()  # a later tie: the first index still wins
    if rows > 1:
        logits[1, 0] = logits[1].max()  # an earlier tie: it wins
    if rows > 2:
        logits[2] = float("-inf")
        logits[-1, vocab // 2] = float("nan")
    dev = platform.device
    got = platform.argmax(logits.to(dev)).cpu()
    want = logits.argmax(dim=-1)
    assert torch.equal(got, want)
    assert int(got[0]) == int(top[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,k", [(1, 1000, 64), (7, 4099, 33), (64, 2000, 256), (13, 37, 1)])
def test_greedy_head(platform, rows, vocab, k, dtype):
    """Greedy tokens from the head (greedy_head, with the platform's screen) are the argmax of the
    platform's own full product, bit for bit, where a screen cannot tell the winners apart: rows of
    the head equal to one part in 10^7 (one exactly equal, so the first index must win), an outlier
    row, rows of x with one dominant element, and rows with a NaN or an inf."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(vocab, k, generator=g) * 0.05
    twins = list(range(5, vocab, max(1, vocab // 40)))
    for j in twins:
        w[j] = w[3] * (1 + 1e-7 * torch.randn(k, generator=g))
    if vocab > 10:
        w[10] = w[3]  # an exact tie with row 3, which comes first
        w[-1] *= 50  # a row with an outlier scale
    w = w.to(dtype)
    x = torch.randn(rows, k, generator=g)
    x[0] = 4 * w[3].float()  # row 3 and its near twins lead
    if rows > 2:
        x[1, 0] = 300.0  # one element dominates the int16 rounding of its row
        x[2] = 4 * w[twins[-1]].float()
    if rows > 4:
        x[3, -1], x[4, 0] = float("nan"), float("inf")
    dev = platform.device
    screen = platform.prepare_greedy_head(w.to(dev))
    head = platform.prepare_linear(w.clone().to(dev))
    if platform.name == "cpu" and cpu_kernels.load() is not None:
        assert screen is not None  # else this would only check the default
    want = platform.argmax(platform.linear(x.to(dev), head).float()).cpu()
    got = platform.greedy_head(x.to(dev), head, screen).cpu()
    assert torch.equal(got, want), (got != want).nonzero()


def _mla_decode_bundle(g, platform, narrow, hidden=96, heads=4, nope=16, rope=8, v=16, rank=32, q_lora=40, weights="int8"):
    """A random MLADecodeLayer on the platform's device, its projections int8 (with scales), fp32 or
    bf16."""
    w = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    shapes = [(q_lora + rank + rope, hidden), (heads * (nope + rope), q_lora), (hidden, heads * v)]
    if weights == "int8":
        (q_kv_a, s_kv), (q_b, s_b), (o, s_o) = [quantize_int8_rows(w(*shape)) for shape in shapes]
    else:
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        (q_kv_a, q_b, o), s_kv = [w(*shape).to(dtype) for shape in shapes], None
        s_b = s_o = None
    w_uk, w_uv = w(heads, nope, rank), w(heads, v, rank)
    if narrow:
        w_uk, w_uv = platform.prepare_absorbed(w_uk.bfloat16().float()), platform.prepare_absorbed(w_uv.bfloat16().float())
    norm = lambda n: torch.rand(n, generator=g) + 0.5  # noqa: E731
    layer = ops.MLADecodeLayer(
        norm(hidden), 1e-6, q_kv_a, s_kv, norm(q_lora), 1e-6, q_b, s_b, norm(rank), 1e-6, w_uk, w_uv, o, s_o,
        heads, nope, rope, v, 0.3,
    )
    return _on_device(layer, platform.device)


def _on_device(bundle, dev):
    tensors = {f.name: getattr(bundle, f.name).to(dev) for f in dataclasses.fields(bundle) if isinstance(getattr(bundle, f.name), torch.Tensor)}
    return dataclasses.replace(bundle, **tensors)


def _decode_batch(g, batch, bs, blocks, width, rope):
    """A paged cache and the tables, lengths, slots and rope angles of one decode step."""
    cache = torch.randn(blocks, bs, width, generator=g)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:3] for _ in range(batch)])
    seq_lens = torch.randint(1, 3 * bs + 1, (batch,), generator=g)
    slots = torch.stack([tables[b, (seq_lens[b] - 1) // bs] * bs + (seq_lens[b] - 1) % bs for b in range(batch)])
    angles = torch.rand(batch, rope // 2, generator=g) * 6
    return cache, tables, seq_lens, slots, angles


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("weights,cache_dtype", [("int8", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_mla_decode_layer(platform, batch, narrow, weights, cache_dtype):
    """A whole MLA decode layer in the platform's own form equals the hooks applied in turn
    (Platform.mla_decode_layer's composition, on this platform's hooks): the output and the latent
    written to the cache; int8 or full-precision projections, an fp32 or bf16 cache."""
    g = torch.Generator().manual_seed(21)
    hidden, rope, rank, bs = 96, 8, 32, 4
    layer = _mla_decode_bundle(g, platform, narrow, weights=weights)
    h = torch.randn(batch, hidden, generator=g)
    cache, tables, seq_lens, slots, angles = _decode_batch(g, batch, bs, 12, rank + rope, rope)
    cache = cache.to(cache_dtype)
    dev = platform.device
    h, cache, tables, seq_lens, slots = (t.to(dev) for t in (h, cache, tables, seq_lens, slots))
    args = (angles.cos().to(dev), angles.sin().to(dev), False)
    fused_cache, composed_cache = cache.clone(), cache.clone()
    got = platform.mla_decode_layer(h, layer, *args, fused_cache, slots, tables, seq_lens)
    want = Platform.mla_decode_layer(platform, h, layer, *args, composed_cache, slots, tables, seq_lens)
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.cpu(), composed_cache.cpu(), atol=1e-6, rtol=1e-6)
    assert not torch.equal(fused_cache, cache)  # the new tokens' latents were written


def _moe_block(g, hidden, routing, routed, shared, int8, inter=24):
    """A random feed-forward bundle: `routed` experts behind a router (none: a dense MLP) and
    `shared` always-chosen ones."""
    w13 = torch.randn(routed + shared, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(routed + shared, hidden, inter, generator=g) * 0.2
    s13 = s2 = None
    if int8:
        (w13, s13), (w2, s2) = quantize_int8_rows(w13), quantize_int8_rows(w2)
    router = torch.randn(routed, hidden, generator=g) * 0.3 if routed else None
    bias = torch.randn(routed, generator=g) * 0.1 if routing is not None and routing.method == "noaux_tc" else None
    return ops.MoEBlock(torch.rand(hidden, generator=g) + 0.5, 1e-6, router, bias, routing, shared, w13, w2, s13, s2)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("precision", ["int8", "full", "bf16-model"])
def test_decode_layers(platform, batch, precision):
    """A decode step's whole stack of layers in the platform's own form equals its layer hooks in
    turn (Platform.decode_layers' composition): a dense MLP layer, a routed one with shared experts
    and narrow absorbed weights, and one with full-precision experts; outputs and every latent
    written. int8 projections and fp32 caches, or full-precision ones (fp32 and bf16 projections
    and experts) over bf16 caches; or a bf16 model's stack (bf16 rows, norms and weights), where a
    platform may keep the rows in fp32 between the layers: bf16 closeness only."""
    g = torch.Generator().manual_seed(23)
    hidden, rope, rank, bs = 96, 8, 32, 4
    int8 = precision == "int8"
    blocks = [
        _moe_block(g, hidden, None, 0, 1, int8=int8),
        _moe_block(g, hidden, ROUTINGS[2], 8, 2, int8=int8),
        _moe_block(g, hidden, ROUTINGS[0], 8, 0, int8=False),
    ]
    bf16_model = precision == "bf16-model"
    if precision == "full":
        blocks[1] = dataclasses.replace(blocks[1], w13=blocks[1].w13.bfloat16(), w2=blocks[1].w2.bfloat16())
    if bf16_model:
        blocks = [dataclasses.replace(b, w13=b.w13.bfloat16(), w2=b.w2.bfloat16(), norm=b.norm.bfloat16()) for b in blocks]
    weights = {"int8": ["int8"] * 3, "full": ["fp32", "bf16", "fp32"], "bf16-model": ["bf16"] * 3}[precision]
    dev = platform.device
    bundles = [_mla_decode_bundle(g, platform, narrow=i == 1, weights=weights[i]) for i in range(len(blocks))]
    if bf16_model:
        bundles = [dataclasses.replace(b, input_norm=b.input_norm.bfloat16(), q_a_norm=b.q_a_norm.bfloat16(),
                                       kv_a_norm=b.kv_a_norm.bfloat16()) for b in bundles]
    stack = ops.DecodeStack(tuple(ops.DecodeLayer(b, _on_device(block, dev)) for b, block in zip(bundles, blocks)))
    h = torch.randn(batch, hidden, generator=g).to(torch.bfloat16 if bf16_model else torch.float32).to(dev)
    cache, tables, seq_lens, slots, angles = _decode_batch(g, batch, bs, 12, rank + rope, rope)
    cache = cache.to(torch.float32 if int8 else torch.bfloat16)
    caches = [cache.to(dev)] + [torch.randn(cache.shape, generator=g).to(cache.dtype).to(dev) for _ in blocks[1:]]
    tables, seq_lens, slots = tables.to(dev), seq_lens.to(dev), slots.to(dev)
    cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
    args = (cos.to(dev), sin.to(dev), False)
    fused, composed = [c.clone() for c in caches], [c.clone() for c in caches]
    got = platform.decode_layers(h, stack, *args, fused, slots, tables, seq_lens)
    assert got.dtype == h.dtype
    if bf16_model:  # against the same values in fp32 throughout: within a few bf16 roundings
        wide = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.int8 else t  # noqa: E731
        stack = ops.DecodeStack(tuple(
            ops.DecodeLayer(*(dataclasses.replace(x, **{f.name: wide(getattr(x, f.name)) for f in dataclasses.fields(x)})
                              for x in (layer.attention, layer.ffn)))
            for layer in stack.layers
        ))
        composed = [c.float() for c in caches]
        want = Platform.decode_layers(platform, h.float(), stack, cos.float().to(dev), sin.float().to(dev), False,
                                      composed, slots, tables, seq_lens)
        tol = lambda t: {"atol": 1e-2 * float(t.abs().max()), "rtol": 1e-2}  # noqa: E731
    else:
        want = Platform.decode_layers(platform, h, stack, *args, composed, slots, tables, seq_lens)
        tol = lambda t: {"atol": 1e-5, "rtol": 1e-5}  # noqa: E731
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **tol(want))
    for a, b, before in zip(fused, composed, caches):
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **(tol(b) if bf16_model else {"atol": 1e-6, "rtol": 1e-6}))
        assert not torch.equal(a, before)
    assert not torch.allclose(got, h)


def _prepared_projections(platform, bundle):
    """The bundle with its projections in the platform's layout (prepare_linear), as a loaded model's."""
    return dataclasses.replace(bundle, **{name: platform.prepare_linear(getattr(bundle, name).clone()) for name in ("q_kv_a", "q_b", "o")})


@pytest.mark.parametrize("batch", [1, 5, 40])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_mla_decode_layer_prepared_projections(platform, batch, weights):
    """Projections in the platform's layout give the fused layer's result for [N, K] ones: q_b's
    120 rows end in a partial panel of a 16-column layout."""
    g = torch.Generator().manual_seed(37)
    raw = _mla_decode_bundle(g, platform, narrow=False, heads=5, weights=weights)
    prepared = _prepared_projections(platform, raw)
    h = torch.randn(batch, 96, generator=g).to(platform.device)
    cache, tables, seq_lens, slots, angles = _decode_batch(g, batch, 4, 12 * max(1, batch // 5), 32 + 8, 8)
    dev = platform.device
    args = (angles.cos().to(dev), angles.sin().to(dev), False)
    cache = cache.to(torch.bfloat16 if weights == "bf16" else torch.float32).to(dev)
    tables, seq_lens, slots = tables.to(dev), seq_lens.to(dev), slots.to(dev)
    outs = []
    for layer in (raw, prepared):
        written = cache.clone()
        outs.append((platform.mla_decode_layer(h, layer, *args, written, slots, tables, seq_lens), written))
    (want, want_cache), (got, got_cache) = outs
    # the same products summed in another order; a bf16 cache rounds the latents that come out; int8
    # rounds each projection's input rows to int16, where the other order may land a step away
    scale = {"bf16": 1e-2, "int8": 1e-4}.get(weights, 2e-5)
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=scale * float(want.abs().max()), rtol=scale)
    torch.testing.assert_close(got_cache.float().cpu(), want_cache.float().cpu(), atol=scale * float(want_cache.float().abs().max()), rtol=scale)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("int8", [False, True])
def test_decode_layers_prepared_weights(platform, batch, int8):
    """A decode stack whose experts and projections the platform prepared (prepare_experts,
    prepare_linear, as a loaded model's are) gives what the same stack with [E, N, K] experts and
    [N, K] projections gives: fp32 (or int8, with int8 projections) and bf16 experts, shared ones
    folded in, a dense MLP left as it is."""
    g = torch.Generator().manual_seed(31)
    hidden, rope, rank, bs = 96, 8, 32, 4
    blocks = [
        _moe_block(g, hidden, None, 0, 1, int8=int8),
        _moe_block(g, hidden, ROUTINGS[2], 8, 2, int8=int8),
        _moe_block(g, hidden, ROUTINGS[0], 8, 0, int8=False),
    ]
    blocks[2] = dataclasses.replace(blocks[2], w13=blocks[2].w13.bfloat16(), w2=blocks[2].w2.bfloat16())
    dev = platform.device
    bundles = [_mla_decode_bundle(g, platform, narrow=False, weights="int8" if int8 else "fp32") for _ in blocks]
    raw = [_on_device(block, dev) for block in blocks]
    prepared = [raw[0]] + [
        dataclasses.replace(b, w13=platform.prepare_experts(b.w13.clone()), w2=platform.prepare_experts(b.w2.clone()))
        for b in raw[1:]
    ]
    h = torch.randn(batch, hidden, generator=g).to(dev)
    cache, tables, seq_lens, slots, angles = _decode_batch(g, batch, bs, 12, rank + rope, rope)
    caches = [cache.to(dev)] + [torch.randn(cache.shape, generator=g).to(dev) for _ in blocks[1:]]
    args = (angles.cos().to(dev), angles.sin().to(dev), False, slots.to(dev), tables.to(dev), seq_lens.to(dev))
    outs = []
    for attention, ffn in ((bundles, raw), ([_prepared_projections(platform, b) for b in bundles], prepared)):
        stack = ops.DecodeStack(tuple(ops.DecodeLayer(b, f) for b, f in zip(attention, ffn)))
        written = [c.clone() for c in caches]
        outs.append((platform.decode_layers(h, stack, *args[:3], written, *args[3:]), written))
    (want, want_caches), (got, got_caches) = outs
    # the same products summed in another order, through three layers (int8: a product's int16
    # rounding of the SiLU products may land a step away, ~1.5e-5 of its row's largest value)
    tol = 1e-4 if int8 else 2e-5
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=tol * float(want.abs().max()), rtol=tol)
    for a, b in zip(got_caches, want_caches):
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=tol * float(b.abs().max()), rtol=tol)
