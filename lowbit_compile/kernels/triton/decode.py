"""In-register decoding shared by the matmul kernels: packed integer codes, FP4 codes, FP4 activation rounding.

Every helper computes exactly what `formats/` computes on the host (the tests compare bit for bit):
- packed codes: element 0 in the low bits; 2/4/8-bit codes fill one byte with L = 8/bits codes, 3-bit codes
  fill 3 bytes with L = 8 codes (a 24-bit little-endian word, code i at bits [3i, 3i+3)).
  A tile is decoded as L *sub-tiles*: sub-tile i holds the codes k = L·j + i of the byte groups j in the tile,
  so no register shuffles are needed (the matmul loads the matching activations with stride L).
- FP4 E{E}M{M} magnitudes at bias 0, `formats.fp4.FP4Format.magnitudes`: code = sign(bit 3) | e | m,
  e ≥ 1: (2^M + m)·2^(e-M), e = 0: m·2^(1-M); integer × power of two, exact in float32 and in bfloat16.
- FP4 activation rounding, `formats.fp4._round_magnitude`: |x|/s (IEEE division) saturated, band exponent from
  the float bits, nearest magnitude with ties to the even code.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pow2(e):
    """2.0**e as float32 for int32 exponents in the normal range, built from the bits (exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def load_code_bytes(q_ptr, row_offs, group_offs, mask, BITS: tl.constexpr):
    """The packed bytes of byte groups `group_offs` in rows `row_offs` (both broadcast to the tile) as int32.

    2/4/8 bits: one byte per group. 3 bits: the 24-bit word of the group's 3 bytes.
    """
    if BITS == 3:
        p = q_ptr + row_offs + 3 * group_offs
        b0 = tl.load(p, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(p + 1, mask=mask, other=0).to(tl.int32)
        b2 = tl.load(p + 2, mask=mask, other=0).to(tl.int32)
        return b0 | (b1 << 8) | (b2 << 16)
    else:
        return tl.load(q_ptr + row_offs + group_offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def code_at(word, i: tl.constexpr, BITS: tl.constexpr):
    """Code i (0 ≤ i < codes per group) of each packed group word."""
    return (word >> (i * BITS)) & ((1 << BITS) - 1)


@triton.jit
def fp4_value(code, E: tl.constexpr, M: tl.constexpr):
    """FP4 code (int32, 0..15) -> its value at bias 0 (float32; code 8 is -0.0)."""
    mag = code & 7
    e = mag >> M
    m = mag & ((1 << M) - 1)
    significand = tl.where(e > 0, m + (1 << M), m)
    value = significand.to(tl.float32) * pow2(tl.maximum(e, 1) - M)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def fp4_round(x, scale, E: tl.constexpr, M: tl.constexpr, MAX_VALUE: tl.constexpr):
    """x (float32) rounded to the FP4 grid at `scale`, returned *unscaled* (a bias-0 FP4 value, sign of x).

    quantize(x, fmt, scale) == fp4_round(x, scale) * scale exactly (both are exact products).
    """
    q = tl.minimum(tl.math.div_rn(tl.abs(x), scale), MAX_VALUE)
    e = (q.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.minimum(tl.maximum(e, 1), (1 << E) - 1)
    r = q * pow2(M - e)  # exact: a power of two; 0 <= r < 2**(M+1)
    fl = tl.floor(r)
    frac = r - fl  # exact for r < 2**23
    odd = (fl.to(tl.int32) & 1) == 1
    rr = tl.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl)  # round half to even
    if M == 0:
        # the magnitude code is e - 1 + rr: a tie goes to the even *code*, so flip where that code is odd
        odd_code = ((e - 1 + rr.to(tl.int32)) & 1) == 1
        rr = tl.where((frac == 0.5) & odd_code, rr - 1.0, rr)
    value = rr * pow2(e - M)
    negative = (x.to(tl.int32, bitcast=True) >> 31) != 0
    return tl.where(negative, -value, value)
