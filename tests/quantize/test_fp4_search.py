"""LLM-FP4 search: per-channel exponents, the never-worse-than-max-scaled guarantee, bad inputs."""

import math

import pytest
import torch

from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import fp4 as f4
from lowbit_compile.quantize import fp4 as q

# A short clipping grid keeps the searches fast; the full CLIP_GRID is exercised once below.
GRID = tuple(sorted({round(0.3 + 0.1 * i, 2) for i in range(9)} | {1.0}))


pytestmark = pytest.mark.usefixtures("one_thread")


def outlier_layer(seed=0, tokens=192, n=48, m=40, outliers=(3, 17, 30)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, list(outliers)] *= 40  # LLM-style outlier channels
    w = torch.randn(m, n, generator=g) * 0.05
    return x, w


def output_mse(res, x, w):
    y = res.quantize_input(x).double() @ res.dequantized_weight().double().T
    return float((y - x.double() @ w.double().T).pow(2).mean())


# ---------------------------------------------------------------- per-channel exponents


def test_channel_exponents_floor_and_clamp():
    amax = torch.tensor([100.0, 50.0, 49.0, 12.5, 1.0, 0.0, 100.0, 26.0])
    k = q.channel_exponents(amax, f4.E2M1)
    assert k.dtype == torch.uint8
    assert k.tolist() == [0, 1, 1, 3, 3, 0, 0, 1]  # floor(log2(100/a)), clamp to 2**2 - 1, zero channel: 0
    assert q.channel_exponents(amax, f4.E3M0).tolist() == [0, 1, 1, 3, 6, 0, 0, 1]
    assert q.channel_exponents(amax, f4.E1M2).max() == 1
    shifted = amax * f4.exponent_multipliers(k)
    assert bool((shifted <= amax.max()).all()), "no channel is pushed past the tensor maximum"


def test_channel_exponents_exact_powers():
    amax = torch.tensor([8.0, 4.0, 2.0, 1.0, 8.0 / 3])
    assert q.channel_exponents(amax, f4.E3M0).tolist() == [0, 1, 2, 3, 1]


@pytest.mark.parametrize("fmt", list(f4.FP4_FORMATS.values()), ids=list(f4.FP4_FORMATS))
def test_pre_shifted_exponent_identity_bit_for_bit(fmt):
    """Q_{ρ+k}(x) = 2**-k Q_ρ(2**k x), channel by channel, exactly."""
    x, w = outlier_layer(seed=1)
    x[:, 0] *= 1000  # so the largest shift is clamped at 2**E - 1 for every format
    k = q.channel_exponents(x.abs().amax(0), fmt)
    assert int(k.max()) == fmt.max_exponent_shift
    xs, ws = q.apply_channel_exponents(x, w, k)
    rho_scale = f4.max_scaled_scale(xs.abs().max(), fmt, 0.7)
    per_channel_scale = rho_scale.float() * 2.0 ** -k.float()  # bias ρ + k_c in channel c
    lhs = f4.quantize(x, fmt, per_channel_scale)
    rhs = f4.quantize(xs, fmt, rho_scale) / f4.exponent_multipliers(k)
    assert torch.equal(lhs, rhs)


def test_apply_channel_exponents_keeps_products_exact():
    x, w = outlier_layer(seed=2)
    k = q.channel_exponents(x.abs().amax(0), f4.E3M0)
    xs, ws = q.apply_channel_exponents(x, w, k)
    assert torch.equal(xs.unsqueeze(1) * ws, x.unsqueeze(1) * w)  # every x_c·W_rc term unchanged
    assert torch.allclose(xs @ ws.T, x @ w.T, rtol=1e-5, atol=1e-5)
    assert xs.abs().max() == x.abs().max()
    assert q.apply_channel_exponents(None, w, k)[0] is None


# ---------------------------------------------------------------- the search


@pytest.mark.parametrize("act_quant,channel_shift", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_never_loses_to_max_scaled(act_quant, channel_shift, seed):
    x, w = outlier_layer(seed)
    base = q.max_scaled_fp4(x, w, act_quant=act_quant)
    res = q.search_fp4_layer(x, w, act_quant=act_quant, channel_shift=channel_shift, clip_grid=GRID)
    assert res.baseline_loss == pytest.approx(base.loss, rel=1e-12)
    assert res.loss <= res.baseline_loss
    assert res.loss < 0.8 * res.baseline_loss, "outlier channels: the search should win clearly"
    assert output_mse(res, x, w) == pytest.approx(res.loss, rel=1e-4)  # stored tensors reproduce the loss
    assert output_mse(base, x, w) == pytest.approx(base.loss, rel=1e-4)


def test_full_llm_fp4_grid_and_channel_shift_help():
    assert len(q.CLIP_GRID) == 101 and 1.0 in q.CLIP_GRID
    assert (q.CLIP_GRID[0], q.CLIP_GRID[-1]) == (0.01, 1.2)
    x, w = outlier_layer(seed=3, tokens=128, n=32, m=24)
    shifted = q.search_fp4_layer(x, w, a_formats=("e2m1",))
    plain = q.search_fp4_layer(x, w, a_formats=("e2m1",), channel_shift=False)
    assert shifted.act_exponents is not None
    assert shifted.loss < plain.loss <= plain.baseline_loss


def _row_search(curves):
    """A _RowSearch over fixed error curves (rows, n), counting the candidates evaluated."""
    calls = []

    def evaluate(idx):
        calls.append(idx.clone())
        return curves.gather(1, idx.unsqueeze(1)).squeeze(1)

    return q._RowSearch(evaluate, curves.shape[0], curves.shape[1]), calls


def test_row_search_coarse_pass_stops_once_the_error_climbs_and_keeps_the_minimum():
    n = len(q.CLIP_GRID)
    coarse, step = q._coarse_to_fine(n)
    g = torch.arange(n, dtype=torch.float64)
    curves = torch.stack([(g - c).pow(2) + 1 for c in (80.0, 55.0, 92.0)])  # smooth, one minimum each
    early, calls = _row_search(curves)
    early.descend(coarse, q.ACT_TURN_RATIO)
    full, _ = _row_search(curves)
    full.descend(coarse)
    assert torch.equal(early.idx, full.idx) and torch.equal(early.err, full.err)
    assert len(calls) < len(coarse), "the pass should end once every row's error has climbed"
    early.scan(step - 1)
    assert early.idx.tolist() == [80, 55, 92]  # the exact minima: within step - 1 of the best coarse points
    # ties go to the lowest index in the descending pass, as an ascending scan keeps the first
    flat, _ = _row_search(torch.ones(1, n, dtype=torch.float64))
    flat.descend(coarse)
    assert int(flat.idx[0]) == 0


def test_row_search_halving_refinement_reaches_every_point_of_the_bracket():
    n = 101
    for target in range(40, 55):
        curve = (torch.arange(n, dtype=torch.float64) - target).abs().unsqueeze(0)
        rs, calls = _row_search(curve)
        rs._take(torch.tensor([47]))
        rs.refine(6)
        assert int(rs.idx[0]) == target and len(calls) == 1 + 6


@pytest.mark.parametrize("a_name", ["e2m1", "e1m2", "e3m0"])
@pytest.mark.parametrize("w_name", ["e2m1", "e1m2", "e3m0"])
def test_integer_products_are_the_quantized_product(a_name, w_name, monkeypatch):
    """The search multiplies quantized tensors as int8 integers (values = ints · scale / int_mult): the integers
    decode to formats.fp4.quantize's values exactly, and the row errors and loss computed from their int32 products
    equal the float64 products' (to the float32 rounding of each difference)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 24, generator=g) * 3
    x[:, 3] *= 40  # an outlier channel: the activation scale clips the rest
    w = torch.randn(13, 24, generator=g) * 0.1
    y64 = x.double() @ w.double().T
    layer = q._Layer(x, w, None, y64)
    a_fmt, w_fmt = f4.fp4_format(a_name), f4.fp4_format(w_name)
    w_scales = f4.max_scaled_scale(w.abs().amax(1), w_fmt, 0.8).unsqueeze(1)
    a_scale = f4.max_scaled_scale(x.abs().max(), a_fmt, 0.3).reshape(1)
    wq, xq = q.round_ints(w, w_fmt, w_scales), q.round_ints(x, a_fmt, a_scale)
    assert wq.ints.dtype == torch.int8 and int(xq.ints.abs().max()) <= 127
    assert torch.equal(wq.values(), f4.quantize(w, w_fmt, w_scales) + 0.0)  # + 0.0: -0 -> +0
    assert torch.equal(xq.values(), f4.quantize(x, a_fmt, a_scale) + 0.0)
    want = (xq.values().double() @ wq.values().double().T - y64).pow(2)
    torch.testing.assert_close(layer.row_errors(xq, wq), want.sum(0), rtol=1e-6, atol=0)
    assert layer.exact_loss(xq, wq) == pytest.approx(float(want.mean()), rel=1e-12)
    # torch's fallback of each piece gives the same numbers
    m = q.int_products(wq.ints, xq.ints)
    assert torch.equal(m, (wq.ints.double() @ xq.ints.double().T).to(torch.int32))
    c = wq.unit.reshape(-1) * xq.unit
    d = m.to(torch.float32) * c.unsqueeze(1) - layer.yt
    torch.testing.assert_close(q.sq_err_rows(m, c, layer.yt), d.double().pow(2).sum(1), rtol=1e-12, atol=0)
    monkeypatch.setenv("LOWBIT_NATIVE_FP4", "0")
    assert torch.equal(q.fp4_ints(w, w_fmt, w_scales), wq.ints) and torch.equal(q.fp4_ints(x, a_fmt, a_scale), xq.ints)
    torch.testing.assert_close(q.sq_err_rows(m, c, layer.yt), d.double().pow(2).sum(1), rtol=1e-12, atol=0)


def test_act_step_picks_the_best_scale_by_the_exact_error():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 24, generator=g) * 3
    w = torch.randn(40, 24, generator=g) * 0.1
    layer = q._Layer(x, w, None, x.double() @ w.double().T)
    fmt = f4.fp4_format("e2m1")
    wq = q.round_ints(w, fmt, f4.max_scaled_scale(w.abs().amax(1), fmt).unsqueeze(1))
    s, xq, i = q._act_step(layer, wq, fmt, q.CLIP_GRID)
    assert float(s) == float(f4.max_scaled_scale(x.abs().max(), fmt, q.CLIP_GRID[i]))
    assert torch.equal(xq.values(), f4.quantize(x, fmt, s) + 0.0)
    coarse, _ = q._coarse_to_fine(len(q.CLIP_GRID))
    errs = []
    for i in coarse:
        xg = f4.quantize(x, fmt, f4.max_scaled_scale(x.abs().max(), fmt, q.CLIP_GRID[i]).reshape(1))
        errs.append(float((xg.double() @ wq.values().double().T - layer.y64).pow(2).sum()))
    found = float((xq.values().double() @ wq.values().double().T - layer.y64).pow(2).sum())
    assert found <= min(errs) * (1 + 1e-6)


def test_screened_search_matches_searching_every_activation_format():
    """The screen drops activation formats before the full search; here it keeps the one a full search picks, so
    the result is the same tensors."""
    x, w = outlier_layer(seed=2, tokens=160, n=40, m=160)
    fast = q.search_fp4_layer(x, w, clip_grid=GRID)
    full = q.search_fp4_layer(x, w, clip_grid=GRID, screen=False)
    assert (fast.w_format, fast.a_format) == (full.w_format, full.a_format)
    assert torch.equal(fast.qweight, full.qweight) and torch.equal(fast.w_scales, full.w_scales)
    assert torch.equal(fast.act_scale, full.act_scale) and fast.loss == full.loss


def test_screen_score_estimates_the_layer_error_from_a_row_subset():
    x, w = outlier_layer(seed=4, tokens=160, n=40, m=512)
    w[7] *= 30  # one row carries most of the output: it must be among the rows screened
    fmt = f4.fp4_format("e2m1")
    wfs = [f4.fp4_format(f) for f in q.ALL_FORMATS]
    whole = q.screen_format(x, w, fmt, None, wfs, GRID, rows=512).score
    part = q.screen_format(x, w, fmt, None, wfs, GRID, rows=64).score
    assert part == pytest.approx(whole, rel=0.25)
    assert q.kept_formats({"a": 1.0, "b": 1.05, "c": 1.2}, margin=0.1) == ["a", "b"]


def test_stored_representation():
    x, w = outlier_layer(seed=4, n=47)  # odd in_features: the last byte holds one code
    res = q.search_fp4_layer(x, w, clip_grid=GRID, fqn="model.layers.0.mlp.up_proj")
    m, n = w.shape
    assert res.fqn == "model.layers.0.mlp.up_proj"
    assert res.qweight.dtype == torch.uint8 and res.qweight.shape == (m, (n + 1) // 2)
    assert res.w_scales.dtype == torch.float16 and res.w_scales.shape == (m, 1)
    assert res.act_scale.dtype == torch.float16 and res.act_scale.shape == (1,)
    assert res.act_exponents.dtype == torch.uint8 and res.act_exponents.shape == (n,)
    assert int(res.act_exponents.max()) <= res.a_format.max_exponent_shift
    assert res.w_bias.shape == (m,)
    assert torch.allclose(f4.bias_to_scale(res.w_bias), res.w_scales.float().squeeze(1))
    assert math.isfinite(res.act_bias)
    # W' = W·2**-k was quantized; the effective weight maps it back to the coordinates of x
    mult = f4.exponent_multipliers(res.act_exponents)
    assert torch.equal(res.effective_weight(), res.dequantized_weight() * mult)
    y = res.quantize_input(x) @ res.dequantized_weight().T
    assert (y - x @ w.T).norm() / (x @ w.T).norm() < 0.2


def test_formats_can_differ_and_are_reported():
    x, w = outlier_layer(seed=5)
    res = q.search_fp4_layer(x, w, w_formats=("e1m2",), a_formats=("e3m0",), clip_grid=GRID)
    assert (res.w_format.name, res.a_format.name) == ("e1m2", "e3m0")


def test_w4a16_leaves_activations_float():
    x, w = outlier_layer(seed=6)
    res = q.search_fp4_layer(x, w, act_quant=False, clip_grid=GRID)
    assert res.a_format is None and res.act_scale is None and res.act_exponents is None
    assert torch.equal(res.quantize_input(x), x)
    assert res.loss <= res.baseline_loss


def test_fixed_act_exponents_are_used():
    x, w = outlier_layer(seed=7)
    k = q.channel_exponents(x.abs().amax(0), f4.E2M1)
    res = q.search_fp4_layer(x, w, act_exponents=k, clip_grid=GRID, rounds=2)
    assert torch.equal(res.act_exponents, k)
    assert output_mse(res, x, w) == pytest.approx(res.loss, rel=1e-4)


def test_all_zero_activations_give_a_defined_scale_and_a_note():
    _, w = outlier_layer(seed=8)
    x = torch.zeros(16, w.shape[1])
    res = q.search_fp4_layer(x, w, clip_grid=GRID, fqn="blk.fc")
    assert res.loss == 0.0 and res.baseline_loss == 0.0
    assert res.act_scale is not None and math.isfinite(res.act_bias)
    assert any("all zero" in n and "blk.fc" in n for n in res.notes)


def test_inf_channel_is_a_user_error_naming_layer_and_channel():
    x, w = outlier_layer(seed=9)
    x[5, 11] = float("inf")
    with pytest.raises(LowbitError, match=r"blk\.attn\.q_proj.*channel 11 contain Inf.*check the calib"):
        q.search_fp4_layer(x, w, fqn="blk.attn.q_proj")


def test_nan_weights_are_a_user_error():
    x, w = outlier_layer(seed=10)
    w[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=r"blk\.o_proj: weight has 1 NaN"):
        q.search_fp4_layer(x, w, fqn="blk.o_proj")


def test_shape_mismatch_is_a_user_error():
    x, w = outlier_layer(seed=11)
    with pytest.raises(LowbitError, match="features"):
        q.search_fp4_layer(x[:, :-1], w)
