import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_compile import formats
from lowbit_compile.errors import LowbitError


def test_grids_are_symmetric_where_it_matters_and_signed_int_where_runtimes_need_it():
    assert formats.int_format(2).levels().tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert formats.int_format(3).levels().tolist() == [-3.5 + i for i in range(8)]
    assert formats.int_format(4).levels().tolist() == list(range(-8, 8))  # XNNPACK / MatMulNBits int4
    assert formats.int_format(8).levels()[0] == -128 and formats.int_format(8).levels()[-1] == 127


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([0, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_quantize_picks_the_nearest_level_and_dequantize_inverts_codes(bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = formats.int_format(bits)
    w = torch.randn(5, 16, generator=g)
    scales = formats.round_scales(torch.rand(5, formats.num_groups(16, group), generator=g) + 0.05)
    codes = formats.quantize_codes(w, scales, fmt, group)
    assert int(codes.max()) <= fmt.max_code
    deq = formats.dequantize(codes, scales, fmt, group)
    levels = fmt.levels()[None, None, :] * formats.expand_scales(scales, 16, group)[..., None]
    nearest = (levels - w[..., None]).abs().min(dim=-1).values
    assert torch.allclose((deq - w).abs(), nearest, atol=1e-6)
    assert torch.equal(formats.quantize_codes(deq, scales, fmt, group), codes)


def test_group_size_must_divide_the_row():
    with pytest.raises(LowbitError, match="does not divide in_features=100"):
        formats.num_groups(100, 64)


def test_bits_per_weight_counts_codes_and_scales():
    assert formats.bits_per_weight(formats.int_format(4), 128, 2, 0) == pytest.approx(4 + 16 / 128)
    assert formats.bits_per_weight(formats.int_format(2), 256, 3, 64) == pytest.approx(2 + 16 / 64)
    assert formats.bits_per_weight(formats.int_format(3), 8, 1, 0) == pytest.approx(3 + 16 / 8)
