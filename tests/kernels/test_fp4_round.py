"""lowbit_native::fp4_round against formats.fp4.quantize: the same bits for every input the FP4 search can meet (normal
values at per-row and per-tensor scales, exact grid points and the ties between them, random bit patterns with
subnormals, zeros of both signs, Inf), NaN where torch gives NaN; and the search's `round_fp4` helper on both paths.
lowbit_native::fp4_ints (the same rounding as int8 integers) and fp4_sq_err (the search's row errors) against torch,
in every instruction-set build of their loops this CPU runs."""

import pytest
import torch

from lowbit_compile.formats import fp4 as f4
from lowbit_compile.kernels import native
from lowbit_compile.quantize import fp4 as q

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason() or "unavailable")

FORMATS = [f4.fp4_format(n) for n in ("e2m1", "e1m2", "e3m0")]


def _native(x, fmt, scale, minus_input=False):
    return torch.ops.lowbit_native.fp4_round(x.contiguous(), scale.to(torch.float32).reshape(-1), fmt.m_bits,
                                             fmt.max_value(0.0), minus_input)


def _same_bits(a, b):
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 48, 96
    normal = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 10
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=g, dtype=torch.int64).to(torch.int32)
    random_bits = bits.view(torch.float32).clone()
    random_bits[~torch.isfinite(random_bits)] = 0.0
    random_bits[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    return normal, random_bits


def _grid_and_ties(fmt, scale):
    """Every grid value at `scale`, the midpoints between neighbours (ties) and their float32 neighbours."""
    mags = fmt.magnitudes().double()
    mids = (mags[1:] + mags[:-1]) / 2
    vals = torch.cat([mags, mids, mids + mids * 2**-23, mids - mids * 2**-23, mags.max() * torch.tensor([1.5, 40.0])])
    vals = (vals * scale).to(torch.float32)
    return torch.cat([vals, -vals]).reshape(2, -1)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_native_rounding_is_quantize_bit_for_bit(fmt, seed):
    normal, random_bits = _inputs(seed)
    g = torch.Generator().manual_seed(seed + 10)
    for x in (normal, random_bits):
        row_scales = f4.max_scaled_scale(x.abs().amax(1, keepdim=True), fmt, 0.7)  # float16, as the search has them
        for scale in (row_scales, row_scales[:1].reshape(1), torch.rand(1, generator=g).to(torch.float16) + 0.01):
            want = f4.quantize(x, fmt, scale if scale.numel() == 1 else scale.reshape(-1, 1))
            _same_bits(_native(x, fmt, scale), want)
            _same_bits(_native(x, fmt, scale, minus_input=True), want - x)
    for scale in (1.0, 0.375, 2.0**-20):
        x = _grid_and_ties(fmt, scale)
        s = torch.tensor([scale], dtype=torch.float32)
        _same_bits(_native(x, fmt, s), f4.quantize(x, fmt, s))


def test_native_rounding_propagates_nan_and_rejects_bad_arguments():
    x = torch.tensor([[float("nan"), 1.0, -float("nan")]])
    out = _native(x, f4.E2M1, torch.tensor([1.0]))
    assert torch.isnan(out[0, [0, 2]]).all() and out[0, 1] == 1.0
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lowbit_native.fp4_round(x.double(), torch.tensor([1.0]), 1, 6.0, False)
    with pytest.raises(RuntimeError, match="one element per row"):
        torch.ops.lowbit_native.fp4_round(torch.ones(3, 4), torch.ones(2), 1, 6.0, False)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_the_search_rounds_the_same_on_both_paths(fmt, monkeypatch):
    normal, _ = _inputs(3)
    scales = f4.max_scaled_scale(normal.abs().amax(1, keepdim=True), fmt, 0.9)
    fast = q.round_fp4(normal, fmt, scales, minus_input=True)
    monkeypatch.setenv("LOWBIT_NATIVE_FP4", "0")
    assert not q.native_rounding()
    _same_bits(fast, q.round_fp4(normal, fmt, scales, minus_input=True))


def _isas():
    return native.supported_isas()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_native_ints_are_the_quantized_values_times_the_multiplier(fmt, monkeypatch):
    """fp4_ints = quantize_unscaled(x) · int_mult(fmt) as int8, exactly, in every loop build (scalar, AVX2, AVX-512),
    at per-row and per-tensor scales, on grid points and ties, rows of odd length (vector tails)."""
    normal, _ = _inputs(4)
    normal = normal[:, :93]
    mult = q.int_mult(fmt)
    row_scales = f4.max_scaled_scale(normal.abs().amax(1, keepdim=True), fmt, 0.6)
    cases = [(normal, row_scales), (normal, row_scales[:1].reshape(1))]
    for scale in (1.0, 0.375, 2.0**-20):
        cases.append((_grid_and_ties(fmt, scale), torch.tensor([scale], dtype=torch.float32)))
    for isa in _isas():
        monkeypatch.setenv("LOWBIT_NATIVE_ISA", isa)
        for x, s in cases:
            want = f4.quantize_unscaled(x, fmt, s if s.numel() == 1 else s.reshape(-1, 1)) * mult
            got = torch.ops.lowbit_native.fp4_ints(x.contiguous(), s.to(torch.float32).reshape(-1), fmt.m_bits,
                                                   fmt.max_value(0.0), mult)
            assert got.dtype == torch.int8
            assert torch.equal(got.to(torch.float32), want + 0.0), isa
            _same_bits(q.round_fp4(x, fmt, s if s.numel() == 1 else s.reshape(-1, 1)),
                       f4.quantize(x, fmt, s if s.numel() == 1 else s.reshape(-1, 1)))
    nan = torch.tensor([[float("nan"), -float("nan"), 1.0]])
    assert torch.ops.lowbit_native.fp4_ints(nan, torch.tensor([1.0]), 1, 12.0, 1.0).tolist() == [[0, 0, 1]]
    with pytest.raises(RuntimeError, match="fit int8"):
        torch.ops.lowbit_native.fp4_ints(normal.contiguous(), row_scales.float().reshape(-1), 1, 6.0, 64.0)


@pytest.mark.parametrize("cols", [1, 8, 61, 512])
def test_native_squared_errors_sum_in_double(cols, monkeypatch):
    """fp4_sq_err(m, c, y)[r] = Σ_t (float32(m)·c[r] − y)², the same in every loop build; per-row and one c."""
    g = torch.Generator().manual_seed(cols)
    m = torch.randint(-3000, 3000, (9, cols), generator=g, dtype=torch.int32)
    y = torch.randn(9, cols, generator=g) * 40
    c = torch.rand(9, generator=g) * 0.01 + 0.001
    results = []
    for isa in _isas():
        monkeypatch.setenv("LOWBIT_NATIVE_ISA", isa)
        for cc in (c, c[:1]):
            want = (m.to(torch.float32) * (cc.unsqueeze(1) if cc.numel() > 1 else cc) - y).double().pow(2).sum(1)
            got = torch.ops.lowbit_native.fp4_sq_err(m, cc, y)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
            results.append(got)
    for a, b in zip(results[0::2], results[2::2]):
        assert torch.equal(a, b)  # a fixed summation order: the same bits on every build
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.lowbit_native.fp4_sq_err(m, c, y[:, :-1].contiguous() if cols > 1 else y[:0])
