"""Numeric formats and bit layouts: the one place that knows how values become bits."""

from .integer import (
    INT_FORMATS,
    SCALE_DTYPE,
    IntFormat,
    bits_per_weight,
    dequantize,
    expand_scales,
    int_format,
    num_groups,
    quantize_codes,
    round_scales,
)
from .packing import PACKABLE_BITS, pack, packed_length, unpack

__all__ = [
    "INT_FORMATS", "SCALE_DTYPE", "IntFormat", "bits_per_weight", "dequantize", "expand_scales",
    "int_format", "num_groups", "quantize_codes", "round_scales",
    "PACKABLE_BITS", "pack", "packed_length", "unpack",
]
