import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_compile import formats
from lowbit_compile.errors import LowbitError


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(formats.PACKABLE_BITS), rows=st.integers(1, 4), n=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_exact(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = formats.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, formats.packed_length(n, bits))
    assert torch.equal(formats.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (4, 2), (8, 1)])
def test_element_zero_sits_in_the_low_bits(bits, per_byte):
    codes = torch.zeros(1, per_byte, dtype=torch.uint8)
    codes[0, 0] = 1
    assert formats.pack(codes, bits).tolist() == [[1]]
    codes = torch.zeros(1, per_byte, dtype=torch.uint8)
    codes[0, -1] = 1
    assert formats.pack(codes, bits).tolist() == [[1 << (8 - bits)]]


def test_three_bit_packs_eight_codes_into_three_bytes_little_endian():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate(range(8)))
    assert formats.pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    assert formats.packed_length(8, 3) == 3 and formats.packed_length(9, 3) == 6


def test_four_bit_layout_matches_the_nibble_convention_of_onnx_and_torchao():
    codes = torch.tensor([[0x3, 0xA, 0xF, 0x1]], dtype=torch.uint8)
    assert formats.pack(codes, 4).tolist() == [[0xA3, 0x1F]]


def test_bad_codes_and_lengths_are_refused():
    with pytest.raises(LowbitError, match="codes must lie"):
        formats.pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(LowbitError, match="supported widths"):
        formats.pack(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(LowbitError, match="need"):
        formats.unpack(torch.zeros(1, 3, dtype=torch.uint8), 2, 16)
