"""A quantized token embedding in plain tensor ops, for the exporters: the packed table's looked-up rows are gathered
(uint8) and decoded with integer multiplies, floor divisions and remainders by powers of two (formats/packing.py's
little-endian layout), which ONNX runs as Gather / Mul / Div / Mod (its `>>` on uint8 exports mistyped) and the
ExecuTorch runtime has kernels for. Exact: the same float32 rows as `lowbit::embedding` (tested)."""

from __future__ import annotations

import torch

from ..formats import int_format
from ..formats.packing import group_shape


class GatherEmbedding(torch.nn.Module):
    """From an integer embedding record, or from an nn.LowbitEmbedding (the ExecuTorch exporter's decomposition)."""

    route = "gather"

    def __init__(self, rec):
        super().__init__()
        self.fqn = rec.fqn
        if hasattr(rec, "num_embeddings"):  # nn.LowbitEmbedding
            self.num_embeddings, self.embedding_dim = rec.num_embeddings, rec.embedding_dim
        else:
            self.num_embeddings, self.embedding_dim = rec.out_features, rec.in_features
        self.bits, self.group_size = rec.bits, rec.group_size
        self.per_group, self.n_bytes = group_shape(rec.bits)
        self.zero = int_format(rec.bits).zero
        self.register_buffer("qweight", rec.qweight.clone())
        self.register_buffer("scales", rec.scales.clone())
        # code j of a group is (word // 2**(bits·j)) % 2**bits; a byte i of it adds byte · 2**(8·i)
        self.register_buffer("code_div", torch.tensor([1 << (rec.bits * j) for j in range(self.per_group)],
                                                      dtype=torch.int32), persistent=False)
        self.register_buffer("byte_mul", torch.tensor([1 << (8 * i) for i in range(self.n_bytes)], dtype=torch.int32),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).to(torch.int32)  # (n, bytes), or (n, blocks, bytes) when shared
        n = rows.shape[0]
        word = (rows.reshape(n, -1, self.n_bytes) * self.byte_mul).sum(-1, keepdim=True)  # ≤ 24 bits: exact
        codes = torch.remainder(torch.div(word, self.code_div, rounding_mode="floor"), 1 << self.bits)
        codes = codes.reshape(n, -1)[:, : self.embedding_dim].to(torch.float32) - self.zero
        scales = self.scales.index_select(0, flat).to(torch.float32)
        groups = scales.shape[1]
        rows = (codes.reshape(n, groups, -1) * scales.unsqueeze(-1)).reshape(n, self.embedding_dim)
        return rows.reshape(*ids.shape, self.embedding_dim)
