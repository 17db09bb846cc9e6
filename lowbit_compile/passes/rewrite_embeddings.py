"""rewrite_embeddings: token embeddings that have a record become `lowbit::embedding` gathers of the packed table.

`embedding_sites(gm)` finds the embedding calls whose weight is a constant of the model (Dynamo parameter
placeholders, get_attr, torch.export signature names) and names each by its module (the nn_module_stack's
nn.Embedding, else the weight's name without ".weight"), as find_linears names linears. The pass replaces each
site whose name has a record (quantize/core.quantize_embeddings) by one `lowbit::embedding` node reading the
record's codes and scales as graph buffers; a tied head keeps its linear (rewrite_linears gives it the same record),
and the float weight stays for whatever else reads it. The node's meta says what it runs (passes/base.RUNTIME).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..kernels.specs import EMBEDDING
from .base import (
    QUANTIZED_TAG,
    RUNTIME,
    PassBase,
    PassResult,
    add_constant,
    buffer_prefix,
    source_to_fqn,
    weight_source,
)

EMBEDDING_TARGETS = (torch.nn.functional.embedding, torch.ops.aten.embedding.default)


@dataclass(frozen=True)
class EmbeddingSite:
    fqn: str
    weight_name: str
    num_embeddings: int
    embedding_dim: int


def _module_fqn(node: torch.fx.Node, weight_name: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        if isinstance(cls, type) and issubclass(cls, torch.nn.Embedding):
            return source_to_fqn(path)
    return weight_name.removesuffix(".weight")


def operands(node: torch.fx.Node) -> tuple:
    """(ids, weight) of an embedding call: F.embedding(input, weight, ...) or aten.embedding(weight, indices, ...)."""
    if node.target is torch.ops.aten.embedding.default:
        return node.args[1], node.args[0]
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def embedding_sites(gm: torch.fx.GraphModule, weight_names: Mapping[str, str] | None = None):
    """[(node, EmbeddingSite)] of the embedding calls with a constant weight, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in EMBEDDING_TARGETS:
            continue
        _, w = operands(node)
        found = weight_source(w, weight_names or {}) if isinstance(w, torch.fx.Node) else None
        val = w.meta.get("val", w.meta.get("example_value")) if found else None
        if val is None and found:
            val = getattr(w.meta.get("grapharg"), "example", None)
        if found is None or val is None or val.dim() != 2:
            continue
        name = found[0]
        out.append((node, EmbeddingSite(_module_fqn(node, name), name, val.shape[0], val.shape[1])))
    return out


class RewriteEmbeddings(PassBase):
    def __init__(self, records: Mapping[str, object], weight_names: Mapping[str, str] | None = None):
        super().__init__()
        self.records = records
        self.weight_names = dict(weight_names or {})

    @classmethod
    def from_context(cls, ctx) -> RewriteEmbeddings:
        return cls(ctx.records)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node, site in embedding_sites(gm, self.weight_names):
            rec = self.records.get(site.fqn)
            if rec is None or (rec.out_features, rec.in_features) != (site.num_embeddings, site.embedding_dim):
                continue
            ids, _ = operands(node)
            p = buffer_prefix(site.fqn)
            qweight = add_constant(gm, p + "_qweight", rec.qweight, node)
            scales = add_constant(gm, p + "_scales", rec.scales, node)
            with graph.inserting_before(node):
                new = EMBEDDING.node(graph, ids=ids, qweight=qweight, scales=scales, bits=rec.bits,
                                     embedding_dim=rec.in_features, group_size=rec.group_size)
            new.meta.update(node.meta)
            new.meta[QUANTIZED_TAG] = site.fqn
            new.meta[RUNTIME] = f"embedding {rec.bits_per_weight():.2f} b/w in memory"
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
