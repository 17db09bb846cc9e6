"""lowbit_native::fp4_round against formats.fp4.quantize: the same bits for every input the FP4 search can meet (normal
values at per-row and per-tensor scales, exact grid points and the ties between them, random bit patterns with
subnormals, zeros of both signs, Inf), NaN where torch gives NaN; and the search's `round_fp4` helper on both paths."""

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
