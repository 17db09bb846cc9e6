"""The weight layout of ATen's CPU int4 kernel (`aten._convert_weight_to_int4pack_for_cpu`), found by probing
this build of torch, and its exact decode: what kernels/cpu.py packs into and cpu_caps.py asks whether it can use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def packed_block_n() -> int | None:
    """The kernel's weight layout on this CPU: rows come in blocks of B (64 on AVX512, 32 on AVX2), stored as
    (N/B, K, B/2) bytes whose low nibbles are rows 0..B/2-1 of the block and high nibbles rows B/2..B-1. Found by
    packing a probe; None when the layout is none of these (then no fast path: we could not decode it)."""
    n, k = 64, 64
    q = (torch.arange(n * k, dtype=torch.int32).reshape(n, k) * 7 + 3) % 16
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    for b in (64, 32):
        if torch.equal(unpack_codes_t(packed, b).t(), q.to(torch.uint8)):
            return b
    return None


def unpack_codes_t(packed: Tensor, block_n: int) -> Tensor:
    """(N, K/2) int4pack bytes -> codes transposed, (K, N) uint8."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // block_n, k, block_n // 2)
    c = torch.cat([b & 15, b >> 4], dim=-1)  # (N/B, K, B): column j of block i is row i·B + j
    return c.permute(1, 0, 2).reshape(k, n)
