"""FP4 with a real-valued exponent bias (LLM-FP4, Liu et al. 2023): E2M1, E1M2, E3M0.

A 4-bit code is sign (bit 3) | exponent e (E bits) | mantissa m (M bits), E + M = 3. At exponent bias b:

    e >= 1 (normal):    (1 + m / 2**M) * 2**(e - b)
    e == 0 (subnormal): (m / 2**M) * 2**(1 - b)

no Inf or NaN; the largest magnitude is (2 - 2**-M) * 2**(2**E - 1 - b). E2M1 at bias 1 is OCP FP4
(torch.float4_e2m1fn_x2): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.

Every value at bias b is the bias-0 value times 2**-b, so a real bias is the same thing as a positive
scale s = 2**-b. The functions here take that **scale**: decode is `magnitude(code) * s`, exact in float32
for a float16 s (magnitudes have at most 4 significant bits), and an integer change of bias is an exact
power-of-two change of scale, which `Q_{b+k}(x) == 2**-k * Q_b(2**k * x)` (pre-shifted exponents) needs.
`bias_to_scale` / `scale_to_bias` convert; `max_scaled_bias` is LLM-FP4's bias from a tensor maximum.

Stored form of an FP4 tensor: codes packed two per byte along the last dimension (element 0 in the low
nibble, `formats.packing`; the byte layout of torch.float4_e2m1fn_x2 for E2M1) plus float16 scales
(per output row for weights, one per tensor for activations). Codes are always chosen for the stored
float16 scale (`round_scale`).

Rounding: the float32 quotient |x| / scale goes to the nearest bias-0 magnitude; a tie (exactly half-way)
goes to the even code (the magnitude code's lowest bit 0), which is IEEE round-half-to-even and matches
torch's/torchao's FP4 conversion. Magnitudes above the maximum saturate to the maximum. The sign is
kept, so -0.0 and negatives that round to zero get code 8 (-0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from . import packing

CODE_BITS = 4
SCALE_DTYPE = torch.float16
# Smallest and largest positive float16: stored scales are clamped into this range.
MIN_SCALE = 2.0**-24
MAX_SCALE = 65504.0


@dataclass(frozen=True)
class FP4Format:
    e_bits: int
    m_bits: int

    def __post_init__(self):
        if self.e_bits < 1 or self.m_bits < 0 or 1 + self.e_bits + self.m_bits != CODE_BITS:
            raise LowbitError(
                f"FP4 format E{self.e_bits}M{self.m_bits}: sign + exponent + mantissa must be 4 bits with at "
                f"least one exponent bit; valid formats: {sorted(FP4_FORMATS)}"
            )

    @property
    def name(self) -> str:
        return f"e{self.e_bits}m{self.m_bits}"

    @property
    def max_exponent_shift(self) -> int:
        """Largest per-channel activation exponent k (2**E - 1), the range of LLM-FP4's integer bias."""
        return (1 << self.e_bits) - 1

    @property
    def standard_bias(self) -> int:
        """The IEEE-style integer bias 2**(E-1) - 1 (1 for E2M1: OCP FP4)."""
        return (1 << (self.e_bits - 1)) - 1

    def max_value(self, bias: float = 0.0) -> float:
        """Largest magnitude at this bias: (2 - 2**-M) * 2**(2**E - 1 - bias)."""
        return (2.0 - 2.0**-self.m_bits) * 2.0 ** (self.max_exponent_shift - bias)

    def magnitudes(self) -> torch.Tensor:
        """The 8 non-negative values at bias 0, indexed by the magnitude code 0..7 (ascending)."""
        vals = []
        for code in range(1 << (self.e_bits + self.m_bits)):
            e, m = code >> self.m_bits, code & ((1 << self.m_bits) - 1)
            frac = m / (1 << self.m_bits)
            vals.append((1.0 + frac) * 2.0**e if e else frac * 2.0)
        return torch.tensor(vals, dtype=torch.float32)

    def grid(self, bias: float = 0.0) -> torch.Tensor:
        """All 16 values at `bias`, indexed by code (bit 3 the sign; code 8 is -0.0), float32."""
        mags = (self.magnitudes().to(torch.float64) * 2.0**-bias).to(torch.float32)  # one rounding
        return torch.cat([mags, -mags])


FP4_FORMATS = {f.name: f for f in (FP4Format(2, 1), FP4Format(1, 2), FP4Format(3, 0))}
E2M1, E1M2, E3M0 = FP4_FORMATS["e2m1"], FP4_FORMATS["e1m2"], FP4_FORMATS["e3m0"]


def fp4_format(name: str | FP4Format) -> FP4Format:
    if isinstance(name, FP4Format):
        return name
    try:
        return FP4_FORMATS[str(name).lower()]
    except KeyError:
        raise LowbitError(f"unknown FP4 format {name!r}; valid: {sorted(FP4_FORMATS)}") from None


def bias_to_scale(bias) -> torch.Tensor:
    """Real exponent bias -> float32 scale 2**-bias (exact for integer biases)."""
    b = torch.as_tensor(bias, dtype=torch.float64)
    return torch.exp2(-b).to(torch.float32)


def scale_to_bias(scale) -> torch.Tensor:
    """Scale -> the real exponent bias it stands for, -log2(scale), float32."""
    return (-torch.log2(torch.as_tensor(scale, dtype=torch.float64))).to(torch.float32)


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Clamp into the positive float16 range and round to float16: the scale as stored."""
    return scale.to(torch.float32).clamp(min=MIN_SCALE, max=MAX_SCALE).to(SCALE_DTYPE)


def max_scaled_scale(amax: torch.Tensor, fmt: FP4Format, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Float16 scale whose format maximum equals clip * amax (clip 1: the max-scaled bias).

    A zero maximum (an all-zero row or tensor) is treated as amax = 1, so the scale is always defined.
    In bias terms this is `max_scaled_bias(amax) - log2(clip)`.
    """
    a = torch.as_tensor(amax, dtype=torch.float32)
    a = torch.where(a > 0, a, torch.ones_like(a))
    return round_scale(a * clip / fmt.max_value(0.0))


def max_scaled_bias(amax, fmt: FP4Format) -> torch.Tensor:
    """LLM-FP4's max-scaled bias: b = log2(max_value(0) / amax), so that max_value(b) == amax.

    Equals the paper's 2**E - log2(amax) + log2(2 - 2**-M) - 1. A zero amax is treated as 1.
    """
    a = torch.as_tensor(amax, dtype=torch.float64)
    a = torch.where(a > 0, a, torch.ones_like(a))
    return (math.log2(fmt.max_value(0.0)) - torch.log2(a)).to(torch.float32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e (float32) for int32 exponents in the normal float32 range, built from the bits: exact."""
    return ((e + 127) << 23).view(torch.float32)


def _round_magnitude(x: torch.Tensor, fmt: FP4Format, scale):
    """|x| / scale rounded to the bias-0 magnitudes, as (r: float32 integer, e: int32 band exponent).

    Inside the band of exponent e (subnormals share e = 1) the magnitude code is linear in the value,
    code = 2**M (e - 1) + q / 2**(e - M), so rounding q / 2**(e - M) to the nearest integer r, half to even,
    rounds to the nearest value r·2**(e - M). For M >= 1 the offset 2**M (e - 1) is even and the code keeps
    the parity of r; for M = 0 an odd offset flips it, so a tie there is moved to the even code.
    NaN stays NaN in r.
    """
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    q = (x.to(torch.float32).abs() / s).clamp_(max=fmt.max_value(0.0))  # saturate (and Inf -> max)
    e = ((q.view(torch.int32) >> 23) - 127).clamp_(min=1, max=fmt.max_exponent_shift)  # floor(log2 q)
    r = q * _pow2(fmt.m_bits - e)  # exact: a power of two
    rr = torch.round(r)
    if fmt.m_bits == 0:
        odd_code = ((e - 1 + rr.to(torch.int32)) & 1).bool()
        rr = rr - ((r - torch.floor(r) == 0.5) & odd_code).to(torch.float32)
    return rr, e


def encode(x: torch.Tensor, fmt: FP4Format, scale) -> torch.Tensor:
    """Nearest FP4 codes (uint8, same shape as x) of x at scale (a tensor broadcastable to x, or a float).

    The value rounded is the float32 quotient |x| / scale (IEEE division), to the nearest magnitude, ties
    to the even code, saturating at the maximum; the sign bit is x's sign bit (see the module docstring).
    NaN has no code: callers validate (`quantize` propagates NaN).
    """
    x = x.to(torch.float32)
    r, e = _round_magnitude(x, fmt, scale)
    code = ((e - 1) << fmt.m_bits) + r.to(torch.int32)
    sign = (x.view(torch.int32) >> 31) & 1
    return (code | (sign << 3)).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: FP4Format, scale) -> torch.Tensor:
    """Codes (uint8) -> float32 values at scale (broadcastable to codes)."""
    table = fmt.grid(0.0).to(codes.device)
    s = torch.as_tensor(scale, dtype=torch.float32, device=codes.device)
    return table.index_select(0, codes.reshape(-1).long()).view(codes.shape) * s


def quantize(x: torch.Tensor, fmt: FP4Format, scale) -> torch.Tensor:
    """Round x to the FP4 grid at scale, float32: decode(encode(x)) without a table lookup; NaN stays NaN. The
    bias-0 value times the positive scale: one rounding, and signs (-0 included) as copysign gives them."""
    return quantize_unscaled(x, fmt, scale).mul_(torch.as_tensor(scale, dtype=torch.float32, device=x.device))


def quantize_unscaled(x: torch.Tensor, fmt: FP4Format, scale) -> torch.Tensor:
    """The bias-0 grid value (at most 4 significant bits, exact in bfloat16) that x rounds to at scale, float32;
    `quantize` is this times the scale. NaN stays NaN.

    The same rounding as `encode` (`_round_magnitude`), in fewer passes: q = |x| / scale saturated, then
    (q + c) - c with c = 1.5·2**(23 + e - M) rounds q to a multiple of 2**(e - M), the spacing of its band e,
    half to even, in one float32 addition (q + c stays in c's binade, so the sum is rounded once at that
    spacing and the subtraction is exact). c is built from q's exponent bits, raised to band 1 below 2.
    Half to even on the multiple is half to even on the code for M >= 1; for M = 0 the code of 2**e is e,
    so a tie 1.5·2**e with e even goes down instead (the one case that differs)."""
    x = x.to(torch.float32)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    q = (x.abs() / s).clamp_(max=fmt.max_value(0.0))  # saturate (and Inf -> max)
    bits = q.view(torch.int32)
    c = (bits & 0x7F800000).clamp_(min=128 << 23).add_(((23 - fmt.m_bits) << 23) | 0x400000).view(torch.float32)
    v = (q + c).sub_(c)
    if fmt.m_bits == 0:
        # q = 1.5·2**e with e >= 1 even: mantissa 0.5, exponent field odd and (q < 2**8, so bit 30 is e >= 1)
        down = (bits & 0x40FFFFFF) == 0x40C00000
        v = torch.where(down, v * 0.5, v)
    return v.copysign_(x)


def exponent_multipliers(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32 for integer exponents k >= 0 (per-channel activation shifts), exact."""
    return (torch.ones_like(k, dtype=torch.int64) << k.to(torch.int64)).to(torch.float32)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """FP4 codes (uint8 in [0, 16)) -> two per byte along the last dimension, element 0 in the low nibble."""
    return packing.pack(codes, CODE_BITS)


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact inverse of `pack_codes`: the first n codes along the last dimension."""
    return packing.unpack(packed, CODE_BITS, n)
