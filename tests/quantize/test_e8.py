"""Block LDLQ with E8 codebooks: the block LDL factor, the exact proxy loss, H = I is nearest rounding, feedback
beats nearest rounding on a correlated Hessian, the scale search, and the errors."""

import pytest
import torch

from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import e8p
from lowbit_compile.quantize import e8
from lowbit_compile.quantize import ldlq as L
from lowbit_compile.quantize.incoherence import Transform
from lowbit_compile.quantize.quip import quantize_quip

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def correlated_hessian(n, seed, samples=None):
    """An SPD E[x xᵀ] with strongly correlated inputs and uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) / n**0.5 + torch.eye(n, dtype=F64)
    x = torch.randn(samples or 4 * n, n, generator=g, dtype=F64) @ mix
    x = x * torch.exp(0.5 * torch.randn(n, generator=g, dtype=F64))
    return x.t() @ x / x.shape[0]


def weight(rows, n, seed, dtype=F64):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_block_ldl_factors_h_with_identity_diagonal_blocks():
    h = L.damp_hessian(correlated_hessian(48, 0)).h
    b = e8.block_ldl(L.ldl_upper(h))
    assert torch.allclose(b.u @ torch.block_diag(*b.d) @ b.u.t(), h, rtol=1e-10, atol=1e-10)
    blocks = b.u.view(6, 8, 6, 8)
    for i in range(6):
        assert torch.equal(blocks[i, :, i, :], torch.eye(8, dtype=F64))
        for j in range(i):
            assert not bool(blocks[i, :, j, :].any())  # block upper triangular
    assert bool((torch.linalg.eigvalsh(b.d) > 0).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_block_ldlq_loss_is_the_proxy_loss_and_h_identity_is_nearest_rounding(bits):
    n, rows = 64, 12
    fmt = e8p.E8Format(bits)
    h = L.damp_hessian(correlated_hessian(n, bits)).h
    w = weight(rows, n, bits)
    scales = e8.base_scales(w, fmt)
    codes, loss = e8.e8_ldlq_factored(w, e8.block_ldl(L.ldl_upper(h)), scales, fmt, block_size=24)
    w_hat = fmt.dequantize(codes).reshape(rows, n).double() * scales.double()
    assert torch.allclose(loss, L.proxy_loss_rows(w, w_hat, h), rtol=1e-9, atol=1e-9)
    identity = L.LDL(torch.eye(n, dtype=F64), torch.ones(n, dtype=F64))
    codes_i, loss_i = e8.e8_ldlq_factored(w, e8.block_ldl(identity), scales, fmt)
    near = e8.quantize_e8_nearest(w, bits, scales=scales)
    assert torch.equal(codes_i, near.codes)
    assert torch.allclose(loss_i, near.loss, rtol=1e-12, atol=1e-12)
    # and the nearest quantizer is what its name says: every group rounds to the codeword nearest w/s
    assert torch.equal(near.codes[..., 0], e8p.encode((w / scales.double()).reshape(rows, -1, 8)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_block_ldlq_beats_nearest_rounding_on_a_correlated_hessian(bits):
    n, rows = 96, 32
    fmt = e8p.E8Format(bits)
    h = correlated_hessian(n, 10 + bits)
    w = weight(rows, n, bits, torch.float32)
    scales = e8.base_scales(w, fmt)
    codes, _ = e8.e8_ldlq_factored(w, e8.block_ldl(L.ldl_upper(h)), scales, fmt)
    ldlq = L.proxy_loss(w, fmt.dequantize(codes).reshape(rows, n) * scales.float(), h)
    nearest = L.proxy_loss(w, e8.quantize_e8_nearest(w, bits, scales=scales).dequantized(), h)
    assert ldlq < 0.9 * nearest, (ldlq, nearest)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_e8_reports_the_loss_under_the_callers_h_and_the_search_never_loses(bits):
    n, rows = 64, 20
    h = correlated_hessian(n, 20 + bits)
    w = weight(rows, n, bits, torch.float32)
    res = e8.quantize_e8(w, h, bits)
    assert res.codes.shape == (rows, n // 8, e8p.E8Format(bits).stages) and res.codes.dtype == torch.int32
    assert res.scales.shape == (rows, 1) and res.scales.dtype == torch.float16
    direct = L.proxy_loss_rows(w, res.dequantized(), h)
    assert torch.allclose(res.loss, direct, rtol=1e-4, atol=1e-6)
    assert bool((res.damped >= res.loss).all())
    single = e8.quantize_e8(w, h, bits, scale_search=False)
    assert bool((res.loss <= single.loss * (1 + 1e-5)).all())  # float32 work: stacked rows round differently


def test_stacked_scale_candidates_give_the_same_result(monkeypatch):
    h, w = correlated_hessian(32, 3), weight(10, 32, 3, torch.float32)
    stacked = e8.quantize_e8(w, h, 2)
    monkeypatch.setattr(e8, "STACK_ROWS", 1)  # one candidate per pass
    alone = e8.quantize_e8(w, h, 2)
    assert torch.equal(stacked.codes, alone.codes) and torch.equal(stacked.scales, alone.scales)
    assert torch.allclose(stacked.loss, alone.loss, rtol=1e-6)


def test_dead_inputs_are_zeroed_and_cost_nothing():
    h = correlated_hessian(32, 4)
    h[5, :] = h[:, 5] = 0
    w = weight(6, 32, 4, torch.float32)
    res = e8.quantize_e8(w, h, 2)
    w0 = w.clone()
    w0[:, 5] = 0
    assert torch.allclose(res.loss, L.proxy_loss_rows(w0, res.dequantized(), h), rtol=1e-4, atol=1e-6)


def test_e8p_beats_scalar_quip_at_two_bits_after_the_same_rotation():
    n, rows = 128, 64
    t = Transform.from_seed(n, rows, 7)
    h = t.rotate_hessian(correlated_hessian(n, 5))
    w = t.rotate_weight(weight(rows, n, 5, torch.float32))
    scalar = quantize_quip(w, h, 2, rotate=False).proxy_loss
    lattice = float(e8.quantize_e8(w, h, 2).loss.sum())
    assert lattice < 0.9 * scalar, (lattice, scalar)


def test_widths_that_are_not_a_multiple_of_8_are_refused():
    with pytest.raises(LowbitError, match="layer fc: E8 codebooks quantize 8 weights at a time.*12 input columns"):
        e8.quantize_e8(torch.zeros(4, 12), torch.eye(12, dtype=F64), 2, fqn="fc")
    with pytest.raises(LowbitError, match="pad them to a multiple of 8"):
        e8.quantize_e8_nearest(torch.zeros(4, 20), 2)
    with pytest.raises(LowbitError, match=r"Hessian has shape \(8, 8\)"):
        e8.quantize_e8(torch.zeros(4, 16), torch.eye(8, dtype=F64), 2)
    with pytest.raises(LowbitError, match="multiple of 8"):
        e8.e8_ldlq_factored(torch.zeros(2, 16), e8.block_ldl(L.ldl_upper(torch.eye(16, dtype=F64))),
                            torch.ones(2, 1), e8p.E8Format(2), block_size=12)


# ----------------------------------------------------------------------------- the layer quantizer (method "e8")


@pytest.mark.parametrize("bits", [2, 3])
def test_quantize_weight_e8_beats_scalar_quip_on_the_proxy_loss(bits):
    """Through quantize_weight, as lb.quantize calls it: the same incoherence (the transform of the layer seed) and
    the loss under the caller's Hessian, lower than scalar QuIP's at the same bits."""
    from lowbit_compile.quantize.incoherence import layer_seed
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.quantize.records import E8QuantizedLinear
    from lowbit_compile.recipe import parse_spec

    n, rows = 256, 64
    h = correlated_hessian(n, 11)
    w = weight(rows, n, 11, torch.float32)
    rec = quantize_weight("enc.fc", w, parse_spec(f"w{bits}-e8"), seed=3, hessian=h)
    quip = quantize_weight("enc.fc", w, parse_spec(f"w{bits}-quip"), seed=3, hessian=h)
    assert isinstance(rec, E8QuantizedLinear) and rec.kind == "e8" and rec.method == "e8"
    assert rec.seed == quip.seed == layer_seed(3, "enc.fc") and torch.equal(rec.su, quip.su)
    assert rec.proxy_loss < 0.95 * quip.proxy_loss, (rec.proxy_loss, quip.proxy_loss)
    exact = float(L.proxy_loss_rows(w.double(), rec.dequantized_weight().double(), h).sum())
    assert rec.proxy_loss == pytest.approx(exact, rel=1e-3)
    assert rec.weight_sha256 is not None and 0 < rec.weight_error < 1
    assert rec.qweight.shape == (rows, n // 8 * bits) and rec.scales.shape == (rows, 1)
    assert abs(rec.bits_per_weight() - bits) < 0.1  # codes + float16 row scales + sign bits


def test_e8_widths_fail_in_the_precheck_with_the_override_that_fixes_them():
    from lowbit_compile.quantize.core import Layer, precheck
    from lowbit_compile.recipe import Recipe

    layers = [Layer("enc.ok", torch.randn(8, 64)), Layer("enc.fc", torch.randn(8, 30))]
    with pytest.raises(LowbitError, match=r"layer enc.fc: E8 codes quantize 8 input columns at a time, but "
                                          r"in_features=30 .*overrides=\{'enc.fc': 'w3-quip'\}"):
        precheck(layers, Recipe.parse("w3-e8"))
    precheck(layers, Recipe.parse("w3-e8", {"enc.fc": "w3-quip"}))  # the proposed fix passes


def test_lb_quantize_refuses_an_e8_width_before_calibrating():
    import lowbit_compile as lb

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(30, 8)

        def forward(self, x):
            raise AssertionError("calibration ran")

    with pytest.raises(LowbitError, match="layer fc: E8 codes"):
        lb.quantize(Model(), "w2-e8-ft", [torch.randn(2, 30)], progress=False)
