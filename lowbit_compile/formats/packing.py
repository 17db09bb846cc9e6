"""Bit packing of integer codes into uint8, element 0 in the low bits (the ONNX / torchao layout).

Codes along the last dimension are taken in groups of L codes that fill B whole bytes exactly
(2-bit: 4 codes -> 1 byte, 3-bit: 8 codes -> 3 bytes, 4-bit: 2 codes -> 1 byte, 8-bit: identity).
Inside a group the codes form one little-endian integer: code i occupies bits [i*bits, (i+1)*bits).
A last dimension that is not a multiple of L is padded with zero codes; unpacking takes the true length.
"""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError

PACKABLE_BITS = (2, 3, 4, 8)


def group_shape(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group) for a bit width."""
    if bits not in PACKABLE_BITS:
        raise LowbitError(f"cannot pack {bits}-bit codes: supported widths are {PACKABLE_BITS}")
    n_bytes = bits // math.gcd(bits, 8)
    return 8 * n_bytes // bits, n_bytes


def packed_length(n: int, bits: int) -> int:
    """Bytes that n codes of this width take along the packed dimension."""
    per_group, n_bytes = group_shape(bits)
    return -(-n // per_group) * n_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dimension into uint8."""
    per_group, n_bytes = group_shape(bits)
    if codes.dtype != torch.uint8:
        raise LowbitError(f"pack expects uint8 codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise LowbitError(f"pack: a code is >= 2**{bits}; codes must lie in [0, {1 << bits})")
    if bits == 8:
        return codes.clone()
    n = codes.shape[-1]
    pad = -n % per_group
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    c = c.reshape(*c.shape[:-1], -1, per_group).to(torch.int32)
    shifts = torch.arange(per_group, dtype=torch.int32, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1, dtype=torch.int32)  # at most 24 bits: exact in int32
    byte_shifts = torch.arange(n_bytes, dtype=torch.int32, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Exact inverse of `pack`: the first n codes along the last dimension, as uint8."""
    per_group, n_bytes = group_shape(bits)
    if packed.dtype != torch.uint8:
        raise LowbitError(f"unpack expects uint8 bytes, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise LowbitError(
            f"unpack: {packed.shape[-1]} bytes along the last dimension, but {n} codes of {bits} bits "
            f"need {packed_length(n, bits)}"
        )
    if bits == 8:
        return packed.clone()
    b = packed.reshape(*packed.shape[:-1], -1, n_bytes).to(torch.int32)
    byte_shifts = torch.arange(n_bytes, dtype=torch.int32, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(per_group, dtype=torch.int32, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1)[..., :n]
    return codes.to(torch.uint8)
