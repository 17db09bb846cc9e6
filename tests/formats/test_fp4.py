"""FP4 formats with a real exponent bias: grids, encode/decode against exhaustive and independent oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import fp4 as f4

FORMATS = list(f4.FP4_FORMATS.values())
IDS = [f.name for f in FORMATS]
OCP_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

try:  # torch's own sub-byte float converters (used to build torch.float4_e2m1fn_x2 tensors)
    from torch.testing._internal.common_quantized import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32
except ImportError:  # pragma: no cover - private module moved
    _f32_to_floatx_unpacked = _floatx_unpacked_to_f32 = None
needs_torch_oracle = pytest.mark.skipif(_f32_to_floatx_unpacked is None, reason="torch FP4 converters moved")


pytestmark = pytest.mark.usefixtures("one_thread")


def formula_value(fmt, code, bias):
    """The LLM-FP4 definition, written out independently of the implementation."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code & 7) >> fmt.m_bits, code & ((1 << fmt.m_bits) - 1)
    if e == 0:
        return sign * (m / 2**fmt.m_bits) * 2.0 ** (1 - bias)
    return sign * (1 + m / 2**fmt.m_bits) * 2.0 ** (e - bias)


def test_e2m1_bias_1_is_ocp_fp4():
    g = f4.E2M1.grid(1.0)
    assert g.tolist() == OCP_FP4 + [-v for v in OCP_FP4]
    assert f4.E2M1.standard_bias == 1 and f4.E2M1.max_value(1.0) == 6.0


@needs_torch_oracle
def test_e2m1_codes_and_bytes_match_torch_float4_e2m1fn_x2():
    assert hasattr(torch, "float4_e2m1fn_x2")
    codes = torch.arange(16, dtype=torch.uint8)
    assert f4.E2M1.grid(1.0).tolist() == _floatx_unpacked_to_f32(codes, 2, 1).tolist()
    from torch.testing._internal.common_quantized import _bfloat16_to_float4_e2m1fn_x2

    x = (torch.randn(8, 34) * 3).to(torch.bfloat16)
    theirs = _bfloat16_to_float4_e2m1fn_x2(x).view(torch.uint8)
    ours = f4.pack_codes(f4.encode(x.float(), f4.E2M1, 0.5))  # bias 1 == scale 0.5
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("bias", [0.0, 1.0, -2.5, 0.3, 3.7])
def test_grid_follows_the_definition(fmt, bias):
    expect = torch.tensor([formula_value(fmt, c, bias) for c in range(16)], dtype=torch.float32)
    assert torch.equal(fmt.grid(bias), expect)
    assert fmt.max_value(bias) == pytest.approx(float(fmt.grid(bias).max()), rel=1e-6)
    assert fmt.max_value(bias) == pytest.approx((2 - 2**-fmt.m_bits) * 2 ** (2**fmt.e_bits - 1 - bias))
    mags = fmt.magnitudes()
    assert bool((mags[1:] > mags[:-1]).all()), "magnitude grows with the code"


@needs_torch_oracle
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_standard_bias_grid_and_rounding_match_torch(fmt):
    """At the IEEE-style bias, torch's (torchao's) converters are an independent oracle: values and ties."""
    b = fmt.standard_bias
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fmt.grid(b), _floatx_unpacked_to_f32(codes, fmt.e_bits, fmt.m_bits))
    g = fmt.grid(b)
    mids = (g[1:8] + g[:7]) / 2
    x = torch.cat([torch.randn(200_000) * fmt.max_value(b) * 0.7, torch.rand(50_000) * 3 * fmt.max_value(b),
                   g, mids, -mids, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    assert torch.equal(f4.encode(x, fmt, 2.0**-b), _f32_to_floatx_unpacked(x, fmt.e_bits, fmt.m_bits))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.1, 3.0e-3, 17.25])
def test_every_code_round_trips(fmt, scale):
    s = f4.round_scale(torch.tensor(scale))
    codes = torch.arange(16, dtype=torch.uint8)
    vals = f4.decode(codes, fmt, s)
    assert torch.equal(f4.encode(vals, fmt, s), codes)  # exact, -0.0 included (code 8)
    assert torch.equal(f4.quantize(vals, fmt, s), vals)
    assert torch.equal(vals, (fmt.grid(0.0) * s.float()))


def nearest_oracle(x, fmt, scale):
    """Distances to all 16 grid values in float64 on the float32 quotient |x| / scale."""
    q = (x.abs() / scale).to(torch.float64)
    mags = fmt.magnitudes().to(torch.float64)
    return (q.unsqueeze(-1) - mags).abs()


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_encode_is_nearest_on_dense_inputs_with_clamping(fmt):
    torch.manual_seed(0)
    rows = 64
    scales = f4.round_scale(torch.rand(rows, 1) * 2 + 1e-3)
    x = torch.randn(rows, 512) * scales.float() * fmt.max_value(0.0) * 0.6
    x[:, :32] *= 10  # far out of range: saturates
    codes = f4.encode(x, fmt, scales)
    dist = nearest_oracle(x, fmt, scales.float())
    chosen = dist.gather(-1, (codes & 7).long().unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.min(dim=-1).values).all())
    assert torch.equal((codes >> 3).bool(), torch.signbit(x))
    big = x.abs() >= fmt.max_value(0.0) * scales.float()
    assert bool(big.any()) and bool(((codes & 7)[big] == 7).all())
    # in x itself: no grid value is nearer than the chosen one beyond float32 rounding of the quotient
    v = f4.decode(codes, fmt, scales)
    g = fmt.grid(0.0) * scales.float().unsqueeze(-1)
    best = (x.unsqueeze(-1) - g).abs().min(dim=-1).values
    assert bool(((x - v).abs() <= best + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_ties_go_to_the_even_code(fmt):
    mags = fmt.magnitudes()
    mids = (mags[1:] + mags[:-1]) / 2
    codes = f4.encode(mids, fmt, 1.0)
    lo = torch.arange(7, dtype=torch.uint8)
    assert torch.equal(codes, torch.where(lo % 2 == 0, lo, lo + 1))
    assert torch.equal(f4.encode(-mids, fmt, 1.0), codes | 8)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_quantize_equals_decode_of_encode(fmt):
    torch.manual_seed(1)
    s = f4.round_scale(torch.rand(16, 1) + 0.01)
    x = torch.randn(16, 300) * 4
    x[0, :5] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-38])
    q = f4.quantize(x, fmt, s)
    d = f4.decode(f4.encode(x, fmt, s), fmt, s)
    assert torch.equal(q, d) and torch.equal(torch.signbit(q), torch.signbit(d))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_quantize_equals_decode_of_encode_at_ties_and_bit_patterns(fmt):
    """quantize's add-and-subtract rounding against encode's: grid values, midpoints (ties) and their float
    neighbours at several float16 scales, and random float32 bit patterns of every magnitude, bit for bit."""
    g = torch.Generator().manual_seed(2)
    mags = fmt.magnitudes()
    pts = torch.cat([mags, (mags[1:] + mags[:-1]) / 2, torch.tensor([fmt.max_value(0.0) * 1.01])])
    for s in f4.round_scale(torch.tensor([1.0, 0.5, 3.0, 0.0123, 2.0**-20, 700.0])).float():
        v = pts * s
        v = torch.cat([v, torch.nextafter(v, torch.tensor(float("inf"))), torch.nextafter(v, torch.tensor(0.0))])
        bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
        x = torch.cat([v, -v, bits.view(torch.float32)])
        x = x[~torch.isnan(x)]
        q, d = f4.quantize(x, fmt, s), f4.decode(f4.encode(x, fmt, s), fmt, s)
        assert torch.equal(q.view(torch.int32), d.view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_quantize_propagates_nan(fmt):
    assert torch.isnan(f4.quantize(torch.tensor([float("nan"), -float("nan")]), fmt, 0.5)).all()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FORMATS), st.floats(-30, 30), st.integers(0, 7), st.integers(0, 2**31 - 1))
def test_integer_bias_shift_is_exact(fmt, rho, k, seed):
    """Q at bias ρ + k equals 2**-k · Q at bias ρ of 2**k · x, bit for bit (the pre-shifted exponent)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, generator=g) * 2.0 ** (-rho) * fmt.max_value(0.0) * 2.0**-k
    s = f4.round_scale(f4.bias_to_scale(rho))
    s_k = s.float() * 2.0**-k
    lhs = f4.quantize(x, fmt, s_k)
    rhs = 2.0**-k * f4.quantize(2.0**k * x, fmt, s)
    assert torch.equal(lhs, rhs)
    assert torch.equal(f4.encode(x, fmt, s_k), f4.encode(2.0**k * x, fmt, s))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_max_scaled_bias(fmt):
    amax = torch.tensor([0.02, 1.0, 7.5, 300.0, 0.0])
    b = f4.max_scaled_bias(amax, fmt)
    paper = 2**fmt.e_bits - torch.log2(amax[:4].double()) + math.log2(2 - 2**-fmt.m_bits) - 1
    assert torch.allclose(b[:4].double(), paper, atol=1e-6)
    for a, bi in zip(amax[:4].tolist(), b[:4].tolist()):
        assert fmt.max_value(bi) == pytest.approx(a, rel=1e-5)
    assert math.isfinite(float(b[4])), "a zero maximum still has a bias (as if max = 1)"
    s = f4.max_scaled_scale(amax, fmt)
    assert s.dtype == torch.float16
    assert torch.allclose(f4.scale_to_bias(s)[:4], b[:4], atol=1e-3)
    clipped = f4.max_scaled_scale(amax, fmt, 0.5)
    assert torch.allclose(f4.scale_to_bias(clipped)[:4], b[:4] + 1, atol=1e-3)


def test_bias_scale_conversion():
    assert f4.bias_to_scale(3).item() == 0.125
    assert f4.bias_to_scale(torch.tensor([-2.0, 0.0])).tolist() == [4.0, 1.0]
    assert f4.scale_to_bias(torch.tensor(0.25)).item() == 2.0
    assert f4.round_scale(torch.tensor([0.0, 1e9])).tolist() == [2.0**-24, 65504.0]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_pack_round_trip(n):
    codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
    packed = f4.pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 1) // 2)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])  # element 0 in the low nibble
    assert torch.equal(f4.unpack_codes(packed, n), codes)


def test_exponent_multipliers_are_powers_of_two():
    k = torch.arange(16, dtype=torch.uint8)
    assert f4.exponent_multipliers(k).tolist() == [2.0**i for i in range(16)]


def test_bad_formats_are_user_errors():
    assert f4.fp4_format("E3M0") is f4.E3M0
    with pytest.raises(LowbitError, match="valid"):
        f4.fp4_format("e4m3")
    with pytest.raises(LowbitError, match="4 bits"):
        f4.FP4Format(2, 2)
