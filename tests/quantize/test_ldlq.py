"""LDLQ = OPTQ exactly, never worse than RTN on the proxy loss; damping and greedy passes."""

import logging

import pytest
import torch

from lowbit_compile import formats
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize import ldlq as L
from lowbit_compile.quantize.rtn import search_scales

F64 = torch.float64


def spd_hessian(n, seed, samples=None, dominant=0.0):
    """A correlated SPD Hessian E[x xᵀ] with uneven channel scales, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    samples = samples or 4 * n
    mix = torch.randn(n, n, generator=g, dtype=F64) / n**0.5 + torch.eye(n, dtype=F64)
    x = torch.randn(samples, n, generator=g, dtype=F64) @ mix
    x = x * torch.exp(torch.randn(n, generator=g, dtype=F64))  # channel scales spanning decades
    if dominant:
        x = x + dominant * torch.randn(samples, 1, generator=g, dtype=F64) * torch.randn(n, generator=g, dtype=F64)
    return x.t() @ x / samples


def weight(rows, n, seed):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def naive_optq(w, h, scales, fmt, group_size):
    """Textbook OPTQ: one column at a time, updates pushed with the upper Cholesky factor of H⁻¹."""
    w = w.clone()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = formats.expand_scales(scales, w.shape[1], group_size).to(F64)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for i in range(w.shape[1]):
        q = torch.round(w[:, i] / s[:, i] + fmt.zero).clamp(0, fmt.max_code)
        codes[:, i] = q.to(torch.uint8)
        err = (w[:, i] - (q - fmt.zero) * s[:, i]) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return codes


def dequant(codes, scales, fmt, group_size):
    return formats.dequantize(codes, scales, fmt, group_size).to(F64)


def damped(h):
    return L.damp_hessian(h).h


@pytest.mark.parametrize("rows,n,bits,group_size,block", [
    (7, 48, 2, 0, 16), (7, 48, 2, 0, 13), (5, 64, 3, 16, 128), (9, 40, 4, 8, 7), (4, 33, 8, 0, 5),
    (6, 96, 4, 32, 32), (3, 17, 2, 0, 1),
])
def test_ldlq_equals_naive_optq(rows, n, bits, group_size, block):
    fmt = formats.int_format(bits)
    for seed in range(3):
        w, h = weight(rows, n, seed), damped(spd_hessian(n, 100 + seed))
        scales = search_scales(w, fmt, group_size)
        got = L.ldlq(w, h, scales, fmt, group_size, block_size=block)
        assert got.dtype == torch.uint8 and got.shape == w.shape
        assert torch.equal(got, naive_optq(w, h, scales, fmt, group_size))


def test_ldlq_loss_is_the_proxy_loss():
    fmt = formats.int_format(3)
    w, dh = weight(8, 64, 0), L.damp_hessian(spd_hessian(64, 1))
    scales = search_scales(w, fmt, 16)
    codes, loss = L.ldlq_factored(w, dh.ldl, scales, fmt, 16, block_size=24)
    want = L.proxy_loss_rows(w, dequant(codes, scales, fmt, 16), dh.h)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_beats_rtn_on_proxy_loss(bits):
    fmt = formats.int_format(bits)
    for seed in range(12):
        w, h = weight(16, 64, seed), spd_hessian(64, 200 + seed, dominant=3.0)
        dh = L.damp_hessian(h)
        scales = search_scales(w, fmt, 0)
        rtn = dequant(formats.quantize_codes(w, scales, fmt, 0), scales, fmt, 0)
        opt = dequant(L.ldlq(w, dh.h, scales, fmt, 0), scales, fmt, 0)
        # LDLQ minimizes the damped loss; on the undamped H it must still win clearly
        assert L.proxy_loss(w, opt, dh.h) <= L.proxy_loss(w, rtn, dh.h)
        assert L.proxy_loss(w, opt, h) < L.proxy_loss(w, rtn, h)


def test_ldlq_float32_matches_float64():
    fmt = formats.int_format(4)
    w, h = weight(32, 128, 3), damped(spd_hessian(128, 3))
    scales = search_scales(w, fmt, 0)
    c64 = L.ldlq(w, h, scales, fmt, 0)
    c32 = L.ldlq(w.float(), h, scales, fmt, 0)
    assert (c64 != c32).float().mean() < 0.01  # only near-ties may round differently


@pytest.mark.parametrize("bits,group_size", [(2, 0), (3, 16), (4, 0)])
def test_greedy_never_increases_proxy_loss(bits, group_size):
    fmt = formats.int_format(bits)
    for seed in range(4):
        w, h = weight(8, 64, seed), damped(spd_hessian(64, 300 + seed, dominant=2.0))
        scales = search_scales(w, fmt, group_size)
        start = [formats.quantize_codes(w, scales, fmt, group_size), L.ldlq(w, h, scales, fmt, group_size)]
        for codes in start:
            before = L.proxy_loss_rows(w, dequant(codes, scales, fmt, group_size), h)
            prev = before
            for passes in (1, 2, 3):
                out = L.greedy_passes(w, h, codes, scales, fmt, group_size, passes, block_size=24)
                after = L.proxy_loss_rows(w, dequant(out, scales, fmt, group_size), h)
                assert bool((after <= before * (1 + 1e-12)).all())
                assert float(after.sum()) <= float(prev.sum()) * (1 + 1e-12)
                prev = after
        # from RTN, the passes find something strictly better
        assert float(prev.sum()) < float(L.proxy_loss_rows(w, dequant(start[0], scales, fmt, group_size), h).sum())


def test_greedy_block_size_does_not_matter():
    fmt = formats.int_format(2)
    w, h = weight(6, 40, 1), damped(spd_hessian(40, 1))
    scales = search_scales(w, fmt, 0)
    codes = formats.quantize_codes(w, scales, fmt, 0)
    a = L.greedy_passes(w, h, codes, scales, fmt, 0, 2, block_size=1)
    b = L.greedy_passes(w, h, codes, scales, fmt, 0, 2, block_size=16)
    assert torch.equal(a, b)
    assert L.greedy_passes(w, h, codes, scales, fmt, 0, 0) is codes


# ----------------------------------------------------------------------------- damping and bad input


def test_damp_hessian_adds_relative_damping():
    h = spd_hessian(32, 5)
    dh = L.damp_hessian(h, damp=0.05)
    want = h + 0.05 * h.diagonal().mean() * torch.eye(32, dtype=F64)
    torch.testing.assert_close(dh.h, want)
    assert dh.damp == 0.05 and not bool(dh.dead.any())
    u, d = dh.ldl.u, dh.ldl.d
    torch.testing.assert_close(u @ torch.diag(d) @ u.t(), dh.h)
    assert torch.equal(u, u.triu()) and torch.allclose(u.diagonal(), torch.ones(32, dtype=F64))


def test_indefinite_hessian_recovers_with_logged_damping(caplog):
    h = spd_hessian(32, 6, samples=8)  # rank 8
    h = h - 0.05 * h.diagonal().mean() * torch.eye(32, dtype=F64)  # accumulation gone wrong: indefinite
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        dh = L.damp_hessian(h, damp=0.01, fqn="model.layers.3.mlp.up_proj")
    assert dh.damp == pytest.approx(0.1)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "model.layers.3.mlp.up_proj" in msgs[0] and "0.1" in msgs[0]
    assert torch.isfinite(dh.ldl.u).all()


def test_singular_hessian_without_damping_recovers(caplog):
    h = spd_hessian(32, 7, samples=8)  # rank 8: not positive definite
    with caplog.at_level(logging.WARNING, logger=L.log.name):
        dh = L.damp_hessian(h, damp=0.0, fqn="blk.0.q")
    assert dh.damp > 0 and len(caplog.records) == 1
    fmt = formats.int_format(2)
    w = weight(4, 32, 0)
    scales = search_scales(w, fmt, 0)
    assert int(L.ldlq(w, dh.h, scales, fmt, 0).max()) <= fmt.max_code


def test_hopeless_hessian_raises():
    h = -torch.eye(8, dtype=F64) * 100
    with pytest.raises(LowbitError, match="layer blk.1.v.*not positive definite"):
        L.damp_hessian(h, fqn="blk.1.v")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_names_the_layer(bad):
    h = spd_hessian(16, 8)
    h[3, 5] = bad
    with pytest.raises(LowbitError, match="layer model.layers.0.self_attn.k_proj.*calibration data"):
        L.damp_hessian(h, fqn="model.layers.0.self_attn.k_proj")


def test_dead_columns_are_reported_and_harmless():
    h = spd_hessian(24, 9)
    dead = torch.tensor([2, 11, 23])
    h[dead, :] = 0
    h[:, dead] = 0
    dh = L.damp_hessian(h)
    assert dh.dead.nonzero().flatten().tolist() == dead.tolist()
    assert bool((dh.h.diagonal()[dead] > 1).all())
    fmt = formats.int_format(2)
    w = weight(5, 24, 1)
    w[:, dh.dead] = 0
    scales = search_scales(w, fmt, 0)
    codes, loss = L.ldlq_factored(w, dh.ldl, scales, fmt, 0)
    assert torch.isfinite(loss).all()
    assert torch.equal(codes, naive_optq(w, dh.h, scales, fmt, 0))


def test_non_square_hessian_is_an_error():
    with pytest.raises(LowbitError, match="layer fc.*shape"):
        L.damp_hessian(torch.eye(4, 5, dtype=F64), fqn="fc")


def test_greedy_reports_its_loss_change():
    fmt = formats.int_format(3)
    w, h = weight(6, 48, 2), damped(spd_hessian(48, 2, dominant=2.0))
    scales = search_scales(w, fmt, 8)
    codes = L.ldlq(w, h, scales, fmt, 8)
    before = L.proxy_loss_rows(w, dequant(codes, scales, fmt, 8), h)
    out, change = L.greedy_refine(w, h, codes, scales, fmt, 8, 2, block_size=20)
    after = L.proxy_loss_rows(w, dequant(out, scales, fmt, 8), h)
    torch.testing.assert_close(before + change, after, rtol=1e-9, atol=1e-12)
    assert bool((change <= 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nearest_code_rounds_like_torch_round(dtype, bits):
    fmt = formats.int_format(bits)
    v = torch.cat([torch.randn(5000, dtype=dtype) * fmt.max_code / 2 + fmt.zero,
                   torch.arange(-2 * 2, 2 * (fmt.max_code + 2), dtype=dtype) / 2])  # every .5 tie, out of range too
    want = torch.round(v).clamp(0, fmt.max_code)
    assert torch.equal(L.nearest_code(v.clone(), fmt), want)


def test_all_finite():
    assert L.all_finite(torch.tensor([1e308, 1e308], dtype=F64))  # the sum overflows, the values do not
    assert not L.all_finite(torch.tensor([1.0, float("nan")]))
    assert not L.all_finite(torch.tensor([float("inf"), float("-inf")]))


def plain_search_scales(w, fmt, group_size, clip_grid):
    """rtn.search_scales as first written: torch.round, then clamp, out-of-place."""
    rows, k = w.shape
    g = formats.num_groups(k, group_size)
    wg = w.to(torch.float32).reshape(rows, g, k // g)
    amax = wg.abs().amax(dim=-1)
    best_err = torch.full((rows, g), float("inf"))
    best = formats.round_scales(amax / fmt.half_range)
    for alpha in clip_grid:
        s = formats.round_scales(alpha * amax / fmt.half_range)
        q = torch.round(wg / s.float().unsqueeze(-1) + fmt.zero).clamp_(0, fmt.max_code)
        err = ((q - fmt.zero) * s.float().unsqueeze(-1) - wg).pow_(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,k,group_size", [(37, 96, 0), (5, 96, 32), (130, 40, 8)])
def test_search_scales_same_as_plain_expression(bits, rows, k, group_size):
    """The in-place search with clamp-then-round picks the very scales of the plain expression: all-zero rows
    (the smallest scale, huge quotients), outliers, exact .5 ties of w / s."""
    from lowbit_compile.quantize.rtn import CLIP_GRID

    fmt = formats.int_format(bits)
    g = torch.Generator().manual_seed(bits + rows)
    w = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0] = 0
    w[1, 3] = 40.0
    w[2] = torch.arange(k) / 2 - k / 4  # halves
    assert torch.equal(search_scales(w, fmt, group_size), plain_search_scales(w, fmt, group_size, CLIP_GRID))
