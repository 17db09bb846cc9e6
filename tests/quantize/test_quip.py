"""QuIP per layer: rotation helps, the record is exact about its weight and loss, bad input is handled."""

import pytest
import torch

import lowbit_compile  # noqa: F401  (registers torch.ops.lowbit)
from lowbit_compile import formats, hadamard
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize import quip
from lowbit_compile.quantize.incoherence import Transform
from lowbit_compile.quantize.ldlq import proxy_loss

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def outlier_weight(rows, n, seed):
    """Student-t entries plus a few huge outliers, in float32 like a checkpoint."""
    g = gen(seed)
    w = torch.distributions.StudentT(3.0).sample((rows, n)) * 0.02
    idx = torch.randint(0, rows * n, (max(1, rows * n // 500),), generator=g)
    w.view(-1)[idx] = 0.5 * torch.sign(torch.randn(idx.numel(), generator=g))
    return w.float()


def hessian(n, seed, dominant=4.0, samples=None):
    """E[x xᵀ] of correlated inputs with uneven channel scales and one dominant direction."""
    g = gen(seed)
    samples = samples or 4 * n
    x = torch.randn(samples, n, generator=g, dtype=F64) @ (torch.eye(n, dtype=F64)
                                                          + torch.randn(n, n, generator=g, dtype=F64) / n**0.5)
    x = x * torch.exp(0.7 * torch.randn(n, generator=g, dtype=F64))
    x = x + dominant * torch.randn(samples, 1, generator=g, dtype=F64) * torch.randn(n, generator=g, dtype=F64)
    return x.t() @ x / samples


def direct_loss(rec, w, h):
    return proxy_loss(w.to(F64), rec.dequantized_weight().to(F64), h)


def run_op(rec, x):
    return torch.ops.lowbit.rotated_linear(
        x, rec.qweight, rec.scales, rec.su, rec.sv, hadamard.factor(rec.in_features),
        hadamard.factor(rec.out_features), None, rec.bits, rec.in_features, rec.group_size)


def test_rotation_makes_weights_incoherent():
    torch.manual_seed(0)
    for n, seed in ((128, 0), (96, 1), (256, 2)):
        w = outlier_weight(64, n, seed)
        wr = Transform.from_seed(n, 64, seed).rotate_weight(w)
        ratio = lambda m: float(m.abs().max() / m.pow(2).mean().sqrt())  # noqa: E731
        assert ratio(wr) < 0.5 * ratio(w)
        torch.testing.assert_close(wr.pow(2).sum(), w.pow(2).sum(), rtol=1e-4, atol=0)  # orthogonal


@pytest.mark.parametrize("bits,group_size", [(2, 0), (3, 32), (4, 0), (4, 16), (8, 0)])
@pytest.mark.parametrize("rotate,rescale", [(True, False), (True, True), (False, False)])
def test_record_loss_and_weight_are_exact(bits, group_size, rotate, rescale):
    torch.manual_seed(1)
    w, h = outlier_weight(32, 96, bits), hessian(96, bits)
    rec = quip.quantize_quip(w, h, bits, group_size, rotate=rotate, rescale=rescale, seed=3, fqn="m.fc")
    assert rec.method == ("quip" if rotate else "optq") and rec.fqn == "m.fc"
    assert (rec.bits, rec.in_features, rec.out_features, rec.group_size) == (bits, 96, 32, group_size)
    assert rec.qweight.dtype == torch.uint8 and rec.scales.dtype == torch.float16
    assert rec.scales.shape == (32, formats.num_groups(96, group_size))
    assert (rec.su is not None) == rotate and (rec.seed is not None) == rotate
    # the recorded proxy loss is the loss of the weight the layer applies, against the caller's (undamped) H;
    # at 8 bits the float32 rotation error of W is no longer small next to the quantization error
    assert rec.proxy_loss == pytest.approx(direct_loss(rec, w, h), rel=2e-4 if bits == 8 else 1e-5)
    err = torch.linalg.vector_norm(rec.dequantized_weight() - w) / torch.linalg.vector_norm(w)
    assert rec.weight_error == pytest.approx(float(err), rel=1e-5)
    x = torch.randn(5, 96)
    torch.testing.assert_close(run_op(rec, x), x @ rec.dequantized_weight().t(), rtol=1e-4, atol=1e-5)


def test_rescale_record_matches_the_op():
    torch.manual_seed(2)
    w = outlier_weight(64, 128, 5)
    h = hessian(128, 5)
    rec = quip.quantize_quip(w, h, 2, rescale=True, seed=1, fqn="blk.0.up")
    signs = Transform.from_seed(128, 64, rec.seed).su
    assert not torch.equal(rec.su.abs(), torch.ones(128))  # the scaling rides on the input signs
    assert torch.equal(torch.sign(rec.su), signs)
    x = torch.randn(7, 128)
    torch.testing.assert_close(run_op(rec, x), x @ rec.dequantized_weight().t(), rtol=1e-4, atol=1e-5)
    # and the effective weight approximates W, not the rescaled W·diag(d)
    assert rec.weight_error < 0.9


def test_quip_beats_optq_on_outliers_at_2_bits():
    for seed in range(3):
        w, h = outlier_weight(64, 128, 10 + seed), hessian(128, 10 + seed, dominant=8.0)
        q = quip.quantize_quip(w, h, 2, seed=seed)
        o = quip.quantize_quip(w, h, 2, rotate=False)
        assert q.proxy_loss < 0.8 * o.proxy_loss
        assert q.weight_error < o.weight_error


@pytest.mark.parametrize("bits,group_size", [(2, 0), (3, 0), (4, 32)])
def test_scale_search_never_loses(bits, group_size):
    for seed in range(3):
        w, h = outlier_weight(48, 128, 20 + seed), hessian(128, 20 + seed)
        for rotate in (True, False):
            on = quip.quantize_quip(w, h, bits, group_size, rotate=rotate, seed=seed)
            off = quip.quantize_quip(w, h, bits, group_size, rotate=rotate, seed=seed, scale_search=False)
            assert on.proxy_loss <= off.proxy_loss * (1 + 1e-6)
            assert direct_loss(on, w, h) <= direct_loss(off, w, h) * (1 + 1e-5)


def test_no_search_uses_rtn_mse_scales():
    w, h = outlier_weight(16, 64, 4), hessian(64, 4)
    rec = quip.quantize_quip(w, h, 3, rotate=False, scale_search=False)
    from lowbit_compile.quantize.rtn import search_scales
    assert torch.equal(rec.scales, search_scales(w, formats.int_format(3), 0))


def test_greedy_passes_lower_the_loss():
    w, h = outlier_weight(48, 128, 30), hessian(128, 30)
    base = quip.quantize_quip(w, h, 2, seed=0)
    more = quip.quantize_quip(w, h, 2, seed=0, greedy=2)
    assert more.proxy_loss == pytest.approx(direct_loss(more, w, h), rel=1e-5)
    assert more.proxy_loss <= base.proxy_loss * (1 + 1e-3)  # greedy minimizes the damped loss


def test_deterministic():
    w, h = outlier_weight(32, 96, 6), hessian(96, 6)
    a = quip.quantize_quip(w, h, 2, seed=5, fqn="x.y")
    b = quip.quantize_quip(w.clone(), h.clone(), 2, seed=5, fqn="x.y")
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and a.seed == b.seed
    assert a.proxy_loss == b.proxy_loss
    c = quip.quantize_quip(w, h, 2, seed=6, fqn="x.y")
    assert c.seed != a.seed and not torch.equal(c.su, a.su)


def test_cached_space_gives_the_same_records():
    """Mixed precision measures every bit width of a layer with one `spaces` dict: rotated, damped and factored
    once; each record is the one a fresh call makes, and owns its sign vectors."""
    w, h = outlier_weight(40, 96, 8), hessian(96, 8)
    spaces = {}
    for bits, kw in ((2, {}), (3, {"group_size": 32}), (4, {}), (2, {"rescale": True}), (3, {"greedy": 1}),
                     (2, {"rotate": False})):
        got = quip.quantize_quip(w, h, bits, seed=3, fqn="a.b", spaces=spaces, **kw)
        want = quip.quantize_quip(w, h, bits, seed=3, fqn="a.b", **kw)
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
        assert got.proxy_loss == want.proxy_loss and got.weight_error == want.weight_error
        if got.su is not None:
            assert torch.equal(got.su, want.su) and torch.equal(got.sv, want.sv)
    assert len(spaces) == 4  # (rotate, rescale, greedy) variants: plain, rescale, greedy, unrotated
    a = quip.quantize_quip(w, h, 2, seed=3, fqn="a.b", spaces=spaces)
    b = quip.quantize_quip(w, h, 3, seed=3, fqn="a.b", spaces=spaces)
    a.su.mul_(2)
    assert not torch.equal(a.su, b.su)


# ----------------------------------------------------------------------------- bad input


def test_rank_deficient_hessian():
    w, h = outlier_weight(16, 64, 7), hessian(64, 7, samples=16)  # rank 16 of 64
    for rotate in (True, False):
        rec = quip.quantize_quip(w, h, 2, rotate=rotate, fqn="blk.3.o")
        assert torch.isfinite(rec.dequantized_weight()).all()
        assert rec.proxy_loss == pytest.approx(direct_loss(rec, w, h), rel=1e-4, abs=1e-9)


def test_dead_inputs():
    w, h = outlier_weight(16, 64, 8), hessian(64, 8)
    dead = [0, 5, 63]
    h[dead, :] = 0
    h[:, dead] = 0
    for rotate in (True, False):
        rec = quip.quantize_quip(w, h, 4, rotate=rotate)
        wd = rec.dequantized_weight()
        assert torch.isfinite(wd).all()
        assert rec.proxy_loss == pytest.approx(direct_loss(rec, w, h), rel=1e-5)
        if not rotate:  # the column was zeroed and gets no feedback: 4-bit codes represent 0 exactly
            assert torch.equal(wd[:, dead], torch.zeros(16, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian(bad):
    w, h = outlier_weight(8, 32, 9), hessian(32, 9)
    h[1, 1] = bad
    with pytest.raises(LowbitError, match="layer model.layers.2.mlp.down_proj.*calibration data"):
        quip.quantize_quip(w, h, 2, fqn="model.layers.2.mlp.down_proj")


def test_input_errors():
    w, h = outlier_weight(8, 32, 9), hessian(32, 9)
    with pytest.raises(LowbitError, match="layer a.b.*Hessian has shape"):
        quip.quantize_quip(w, h[:16, :16], 2, fqn="a.b")
    with pytest.raises(LowbitError, match="layer a.b.*group size 12"):
        quip.quantize_quip(w, h, 2, 12, fqn="a.b")
    with pytest.raises(LowbitError, match="rotate=True"):
        quip.quantize_quip(w, h, 2, rotate=False, rescale=True, fqn="a.b")
    with pytest.raises(LowbitError, match="int5|supported"):
        quip.quantize_quip(w, h, 5)
    w[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="layer a.b.*NaN"):
        quip.quantize_quip(w, h, 2, fqn="a.b")


def test_rescale_factors():
    w = torch.randn(8, 16)
    h = torch.diag(torch.arange(16, dtype=F64))
    w[:, 3] = 0
    d = quip.rescale_factors(w, h)
    assert d[0] == 1 and d[3] == 1  # diag H = 0, column of zeros
    ok = torch.ones(16, dtype=torch.bool)
    ok[[0, 3]] = False
    assert float(d[ok].log().mean()) == pytest.approx(0, abs=1e-12)
    ratio = (h.diagonal()[ok] / w[:, ok].double().square().sum(0)).pow(0.25)
    torch.testing.assert_close(d[ok] / ratio, (d[ok] / ratio)[0].expand(14))
