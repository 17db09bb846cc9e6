"""Symmetric integer grids with per-channel or per-group scales.

value = (code - zero) * scale, code in [0, 2**bits).

- 2 and 3 bits use the *midrise* grid, zero = (2**bits - 1) / 2: levels {-1.5, -0.5, 0.5, 1.5} at 2 bits.
  At 4 and 8 levels a grid symmetric about 0 that uses every code is worth much more than an exact zero;
  incoherence-processed weights are close to Gaussian with zero mean, so symmetry matters.
- 4 and 8 bits use the *midtread* grid, zero = 2**(bits-1): signed int4/int8 values [-8, 7] / [-128, 127],
  exactly what XNNPACK, torchao and onnxruntime's MatMulNBits (default zero point) consume.

Scales are stored as float16, shape (rows, groups); group_size 0 means one scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from . import packing

SCALE_DTYPE = torch.float16
# Smallest stored scale: the smallest float16 subnormal, so an all-zero row still has a valid scale.
MIN_SCALE = 2.0**-24


@dataclass(frozen=True)
class IntFormat:
    bits: int

    def __post_init__(self):
        if self.bits not in packing.PACKABLE_BITS:
            raise LowbitError(f"integer format with {self.bits} bits: supported widths are {packing.PACKABLE_BITS}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero(self) -> float:
        return self.max_code / 2 if self.bits <= 3 else float(1 << (self.bits - 1))

    @property
    def half_range(self) -> float:
        """Levels per unit scale from 0 to the largest magnitude: max|w| / half_range is the unclipped scale."""
        return self.max_code / 2

    def levels(self) -> torch.Tensor:
        """All representable values at scale 1, ascending."""
        return torch.arange(self.max_code + 1, dtype=torch.float32) - self.zero


INT_FORMATS = {f"int{b}": IntFormat(b) for b in packing.PACKABLE_BITS}


def int_format(name_or_bits) -> IntFormat:
    if isinstance(name_or_bits, int):
        name_or_bits = f"int{name_or_bits}"
    try:
        return INT_FORMATS[name_or_bits]
    except KeyError:
        raise LowbitError(f"unknown integer format {name_or_bits!r}; valid: {sorted(INT_FORMATS)}") from None


def num_groups(in_features: int, group_size: int) -> int:
    if group_size == 0:
        return 1
    if group_size < 0 or in_features % group_size:
        raise LowbitError(
            f"group size {group_size} does not divide in_features={in_features}: pick a group size that "
            f"divides it, or group_size=0 for one scale per output channel"
        )
    return in_features // group_size


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(rows, groups) -> (rows, in_features) float32, each scale repeated over its group."""
    g = num_groups(in_features, group_size)
    if scales.shape[-1] != g:
        raise LowbitError(f"scales have {scales.shape[-1]} groups per row, expected {g}")
    s = scales.to(torch.float32)
    return s.repeat_interleave(in_features // g, dim=-1)


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, fmt: IntFormat, group_size: int) -> torch.Tensor:
    """Nearest-level codes of w (rows, in_features) under the given (already float16-rounded) scales."""
    s = expand_scales(scales, w.shape[-1], group_size)
    q = torch.round(w.to(torch.float32) / s + fmt.zero)
    return q.clamp_(0, fmt.max_code).to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: IntFormat, group_size: int) -> torch.Tensor:
    """Codes (rows, in_features) uint8 -> float32 values."""
    s = expand_scales(scales, codes.shape[-1], group_size)
    return (codes.to(torch.float32) - fmt.zero) * s


def round_scales(scales: torch.Tensor) -> torch.Tensor:
    """Clamp to a positive float16 so codes are chosen for the scale actually stored."""
    return scales.clamp(min=MIN_SCALE, max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)


def bits_per_weight(fmt: IntFormat, in_features: int, out_features: int, group_size: int,
                    sign_bits: int = 0) -> float:
    """Bits per weight as stored: packed codes + float16 scales (+ optional per-layer metadata bits)."""
    code_bytes = packing.packed_length(in_features, fmt.bits) * out_features
    scale_bits = 16 * out_features * num_groups(in_features, group_size)
    return (8 * code_bytes + scale_bits + sign_bits) / (in_features * out_features)
