"""`lowbit::embedding`: a token embedding whose rows are stored as packed integer codes with per-row (or per-group)
scales, decoded only for the rows a call gathers.

    out[..., :] = (codes[ids[...], :] − zero) · scales[ids[...], group]        (the integer grid of formats/)

The table is the same packed form a QuantizedLinear holds (out_features = vocabulary, in_features = embedding
dimension, unrotated: a gathered row could not be un-rotated by itself), so a tied output head shares it: the head
runs the record as a linear, the embedding as this gather. Gathering packed rows moves bits/8 bytes per weight of
each looked-up row; decoding one row of d weights costs O(d), so the op is fast in pure torch and has no separate
CPU kernel. Exact: the output is the record's dequantized rows bit for bit (float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


@torch.library.custom_op("lowbit::embedding", mutates_args=())
def embedding(ids: Tensor, qweight: Tensor, scales: Tensor, bits: int, embedding_dim: int,
              group_size: int) -> Tensor:
    """Rows `ids` of the packed table (qweight uint8 (vocab, packed), scales float16 (vocab, groups)), float32."""
    flat = ids.reshape(-1)
    rows = reference.dequantize_weight(qweight.index_select(0, flat), scales.index_select(0, flat), bits,
                                       embedding_dim, group_size)
    return rows.reshape(*ids.shape, embedding_dim)


@embedding.register_fake
def _(ids, qweight, scales, bits, embedding_dim, group_size):
    torch._check(not ids.is_floating_point(), lambda: f"lowbit::embedding: ids must be integers, got {ids.dtype}")
    return ids.new_empty((*ids.shape, embedding_dim), dtype=torch.float32)
