"""E8P: the construction, the exact nearest-codeword encoder (against search over all 65536), the code layout,
packing, the residual 3/4-bit formats and the 1-bit E8 ball."""

import itertools

import pytest
import torch

from lowbit_compile import formats
from lowbit_compile.errors import LowbitError
from lowbit_compile.formats import e8p
from lowbit_compile.quantize.rtn import search_scales

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def brute_force(x, grid):
    """Lowest code among the nearest rows of grid, by search over all of them: argmin of ‖c‖² − 2x·c in float64
    (exact for the dyadic inputs that make ties; argmin returns the first of equal minima)."""
    g = grid.to(F64)
    norm2, gt = g.square().sum(dim=-1), g.t().contiguous()
    out = [torch.addmm(norm2, c, gt, alpha=-2).argmin(dim=-1) for c in x.to(F64).reshape(-1, 8).split(256)]
    return torch.cat(out).to(torch.int32)


def adversarial(seed, n=150):
    """Inputs with exact ties: dyadic points, midpoints between codewords, codewords, zeros, huge values."""
    g = torch.Generator().manual_seed(seed)
    cb = e8p.codebook()
    i, j = torch.randint(0, 65536, (2, n), generator=g)
    near = cb[i] + torch.randint(-2, 3, (n, 8), generator=g) / 4  # a codeword moved by a few quarter steps
    parts = [torch.randint(-12, 13, (n, 8), generator=g) / d for d in (1, 2, 4, 8)]
    parts += [torch.randint(-2, 3, (n, 8), generator=g) / d for d in (2, 4, 8)]
    parts += [(cb[i] + cb[j]) / 2, (cb[i] + near) / 2, cb[i], torch.zeros(3, 8), torch.full((2, 8), 0.25),
              torch.randint(-3, 4, (n, 8), generator=g) * 64.0]
    return torch.cat(parts).float()


# ----------------------------------------------------------------------------- construction


def test_abs_grid_is_the_norm_10_shell_of_the_half_integer_coset_plus_29_of_norm_12():
    grid = e8p.abs_grid()
    assert grid.shape == (256, 8) and len(torch.unique(grid, dim=0)) == 256
    shell = {v for v in itertools.product((0.5, 1.5, 2.5, 3.5), repeat=8) if sum(a * a for a in v) <= 10}
    assert {tuple(r) for r in grid[:e8p.N_SHELL].tolist()} == shell and len(shell) == 227
    assert grid[:227].tolist() == sorted(grid[:227].tolist())  # lexicographic: the tie rule relies on it
    tail = grid[227:]
    assert bool((tail.square().sum(dim=-1) == 12).all()) and bool(((tail == 1.5).sum(dim=-1) == 5).all())
    assert torch.equal(e8p.abs_parity(), ((grid == 1.5).sum(dim=-1) % 2))


def test_codebook_has_65536_distinct_points_of_e8_plus_a_quarter_with_odd_integer_quarters():
    cb = e8p.codebook()
    assert cb.shape == (65536, 8) and len(torch.unique(cb, dim=0)) == 65536  # no duplicates
    shift = torch.where(torch.arange(65536) % 2 == 1, 0.25, -0.25)[:, None]
    lattice = (cb - shift).double()  # must lie in D8 + ½: half-odd entries with an even sum
    assert bool((lattice * 2 % 2 == 1).all()) and bool((lattice.sum(dim=-1) % 2 == 0).all())
    quarters = cb * 4
    assert torch.equal(quarters, quarters.round()) and bool((quarters % 2 == 1).all())
    assert quarters.min() == -11 and quarters.max() == 11
    digits = 2 * cb + 7.5  # decoded entries are 4-bit midrise digits: (c − 7.5) / 2 with c in [2, 13]
    assert torch.equal(digits, digits.round()) and digits.min() == 2 and digits.max() == 13


def test_decode_follows_the_documented_bit_layout():
    g = torch.Generator().manual_seed(0)
    grid, par = e8p.abs_grid().tolist(), e8p.abs_parity().tolist()
    for code in torch.randint(0, 65536, (300,), generator=g).tolist() + [0, 1, 0xFFFF, 0x1234]:
        a = grid[code >> 8]
        neg = [(code >> k) & 1 for k in range(8)]
        neg[0] = (sum(neg[1:]) + par[code >> 8]) % 2
        want = [(-1 if n else 1) * v + (0.25 if code & 1 else -0.25) for n, v in zip(neg, a)]
        assert e8p.decode(torch.tensor(code)).tolist() == want


# ----------------------------------------------------------------------------- encode


def test_every_code_encodes_back_bit_for_bit():
    assert torch.equal(e8p.encode(e8p.codebook()), torch.arange(65536, dtype=torch.int32))


def test_encode_is_the_nearest_codeword_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 8, generator=g) * s for s in (0.2, 1.0, 2.5, 40.0)])
    assert torch.equal(e8p.encode(x), brute_force(x, e8p.codebook()))


def test_encode_breaks_exact_ties_to_the_lowest_code():
    x = adversarial(1)
    got, want = e8p.encode(x), brute_force(x, e8p.codebook())
    assert torch.equal(got, want)
    cb = e8p.codebook().double()
    d = (x.double()[:, None] - cb[None, :64]).square().sum(dim=-1)  # a sanity check that ties really occur
    assert int((d == d.amin(dim=-1, keepdim=True)).sum(dim=-1).gt(1).sum()) > 10
    assert int(e8p.encode(torch.zeros(8))) == int(brute_force(torch.zeros(1, 8), e8p.codebook())[0])


def test_encode_shapes_dtypes_and_errors():
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    c = e8p.encode(x)
    assert c.shape == (2, 3) and c.dtype == torch.int32
    assert e8p.decode(c).shape == (2, 3, 8) and e8p.decode(c).dtype == torch.float32
    with pytest.raises(LowbitError, match="vectors of 8 values"):
        e8p.encode(torch.zeros(4, 6))
    with pytest.raises(LowbitError, match="NaN or Inf"):
        e8p.encode(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(LowbitError, match=r"codes must lie in \[0, 65536\)"):
        e8p.decode(torch.tensor([65536]))
    with pytest.raises(LowbitError, match="integer codes"):
        e8p.decode(torch.tensor([1.0]))


# ----------------------------------------------------------------------------- storage


def test_codes_pack_little_endian_and_round_trip_exactly():
    fmt2, fmt3, fmt4 = (e8p.E8Format(b) for b in (2, 3, 4))
    packed = e8p.pack_codes(torch.tensor([[[0x1234], [0xFFFF]]]), fmt2)
    assert packed.tolist() == [[0x34, 0x12, 0xFF, 0xFF]] and packed.dtype == torch.uint8
    assert e8p.pack_codes(torch.tensor([[0xBEEF, 0xA5]]), fmt3).tolist() == [0xEF, 0xBE, 0xA5]
    assert e8p.pack_codes(torch.tensor([[0xBEEF, 0x0102]]), fmt4).tolist() == [0xEF, 0xBE, 0x02, 0x01]
    g = torch.Generator().manual_seed(0)
    for fmt in (fmt2, fmt3, fmt4):
        limits = [65536, 256 if fmt.bits == 3 else 65536][:fmt.stages]
        codes = torch.stack([torch.randint(0, m, (3, 5, 7), generator=g) for m in limits], dim=-1).to(torch.int32)
        packed = e8p.pack_codes(codes, fmt)
        assert packed.shape == (3, 5, 7 * fmt.bytes_per_group)
        assert torch.equal(e8p.unpack_codes(packed, fmt), codes)
    # all 65536 codes, and the stored bytes read as int16 on a little-endian host decode the same
    every = torch.arange(65536, dtype=torch.int32)[:, None]
    packed = e8p.pack_codes(every, fmt2)
    assert torch.equal(e8p.unpack_codes(packed, fmt2), every)
    assert torch.equal(e8p.decode(packed.view(torch.int16)), e8p.codebook())
    with pytest.raises(LowbitError, match="2 per group"):
        e8p.unpack_codes(torch.zeros(3, dtype=torch.uint8), fmt2)
    with pytest.raises(LowbitError, match=r"\[0, 256\)"):
        e8p.pack_codes(torch.tensor([[0, 256]]), fmt3)


def test_bits_per_weight_counts_codes_and_the_row_scale():
    assert e8p.bits_per_weight(e8p.E8Format(2), 128) == pytest.approx(2 + 16 / 128)
    assert e8p.bits_per_weight(e8p.E8Format(3), 64) == pytest.approx(3 + 16 / 64)
    assert e8p.bits_per_weight(e8p.E8Format(4), 8) == pytest.approx(4 + 16 / 8)
    with pytest.raises(LowbitError, match=r"supported are \(2, 3, 4\)"):
        e8p.E8Format(5)


# ----------------------------------------------------------------------------- the E8 ball and residual formats


def test_e8_ball_is_241_lattice_points_of_norm_at_most_2_and_15_of_norm_4():
    ball = e8p.e8_ball().double()
    assert ball.shape == (256, 8) and len(torch.unique(ball, dim=0)) == 256
    n2 = ball.square().sum(dim=-1)
    assert int((n2 <= 2).sum()) == 241 and bool((n2[241:] == 4).all())
    integral = (ball == ball.round()).all(dim=-1)
    half = (ball * 2 % 2 == 1).all(dim=-1)
    assert bool((integral | half).all()) and bool((ball.sum(dim=-1) % 2 == 0).all())  # E8 = D8 ∪ (D8 + ½)


def test_encode_ball_is_the_nearest_point_with_lowest_code_ties():
    g = torch.Generator().manual_seed(2)
    ball = e8p.e8_ball()
    i, j = torch.randint(0, 256, (2, 500), generator=g)
    x = torch.cat([torch.randn(1000, 8, generator=g), adversarial(3, 200), (ball[i] + ball[j]) / 2,
                   torch.randint(-2, 3, (500, 8), generator=g) / 2.0])
    assert torch.equal(e8p.encode_ball(x), brute_force(x, ball))
    assert torch.equal(e8p.encode_ball(ball), torch.arange(256, dtype=torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_formats_quantize_greedily_and_decode_exactly(bits):
    fmt = e8p.E8Format(bits)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(bits))
    codes, values = fmt.quantize(x)
    assert codes.shape == (300, fmt.stages) and codes.dtype == torch.int32
    assert torch.equal(fmt.dequantize(codes), values)
    assert torch.equal(codes[:, 0], e8p.encode(x))
    if bits > 2:
        r = (x.double() - e8p.decode(codes[:, 0]).double()) * fmt.ratio
        second = e8p.encode_ball(r) if bits == 3 else e8p.encode(r)
        assert torch.equal(codes[:, 1], second)
    # values are exact small dyadic numbers: 4 bits: 16·v odd in [-55, 55]; 3 bits: 4·v in [-15, 15]
    unit = {2: 4, 3: 4, 4: 16}[bits]
    assert torch.equal(values * unit, (values * unit).round())
    assert float((values * unit).abs().max()) <= {2: 11, 3: 15, 4: 55}[bits]


def test_lattice_codebooks_beat_scalar_grids_at_equal_bits_on_gaussian_rows():
    """The measured claim of the format, as a regression: MSE on Gaussian rows with per-row scales."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    rms = w.square().mean(dim=-1, keepdim=True).sqrt()
    for bits in (2, 3, 4):
        fmt = formats.int_format(bits)
        s = search_scales(w, fmt, 0)
        scalar = (formats.dequantize(formats.quantize_codes(w, s, fmt, 0), s, fmt, 0) - w).square().mean()
        e8 = e8p.E8Format(bits)
        v = e8.quantize((w / rms * e8.gaussian_scale).reshape(-1, 8))[1].reshape(w.shape)
        lattice = (v * rms / e8.gaussian_scale - w).square().mean()
        assert lattice < 0.85 * scalar, (bits, float(lattice), float(scalar))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_digits_reproduce_every_format_exactly(bits):
    fmt = e8p.E8Format(bits)
    g = torch.Generator().manual_seed(bits)
    c1 = torch.randint(0, e8p.N_CODES, (5, 64), generator=g)
    c2 = torch.randint(0, 256 if bits == 3 else e8p.N_CODES, (5, 64), generator=g)
    codes = torch.stack([c1, c2], dim=-1)[..., :fmt.stages].to(torch.int32)
    digits = e8p.int4_digits(codes, fmt)
    assert digits.dtype == torch.uint8 and digits.shape == (fmt.stages, 5, 512) and int(digits.max()) <= 15
    mult = torch.tensor(e8p.DIGIT_MULTIPLIERS[bits], dtype=F64).view(-1, 1, 1)
    rebuilt = (mult * (digits.to(F64) - e8p.DIGIT_ZERO)).sum(0)
    assert torch.equal(rebuilt, fmt.dequantize(codes).reshape(5, 512).to(F64))
    # all codewords: E8P digits span [2, 13] exactly
    if bits == 2:
        every = torch.arange(e8p.N_CODES, dtype=torch.int32).view(1, -1, 1)
        d = e8p.int4_digits(every, fmt)
        assert (int(d.min()), int(d.max())) == (2, 13)
    with pytest.raises(LowbitError, match="codes must have shape"):
        e8p.int4_digits(codes[0], fmt)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_digit_tables_give_int4_digits_from_the_code_bytes_exactly(bits):
    """The exporters' table decode (two gathers, a product, a sum) equals int4_digits: every E8P code, and every
    residual code at 3 and 4 bits."""
    fmt = e8p.e8_format(bits)
    first = torch.arange(e8p.N_CODES, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    second = torch.randint(0, 256 if bits == 3 else e8p.N_CODES, (e8p.N_CODES,), generator=g, dtype=torch.int32)
    codes = (first if bits == 2 else torch.stack([first, second], dim=-1)).reshape(256, 256, fmt.stages)
    packed = e8p.pack_codes(codes, fmt)
    assert torch.equal(e8p.digits_from_bytes(packed, fmt), e8p.int4_digits(codes, fmt))
    t = e8p.digit_tables()
    assert sum(x.numel() for x in (t.magnitudes, t.signs, t.offsets, t.ball)) == 256 * 25
