"""rewrite_linears: replace tagged linears that have a QuantizedLinear record with `lowbit::rotated_linear`.

Packed codes, scales and sign vectors become buffers of the GraphModule (get_attr nodes); the dense
Hadamard factors are shared by every layer of the same size. Only the linear call is replaced, so a weight
that also feeds an embedding (tied lm_head) keeps serving it in float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .. import hadamard
from ..checkpoint import QuantizedLinear
from ..errors import LowbitError
from .base import PassBase, PassResult, fake_mode_of
from .find_linears import TAG, linear_sites

QUANTIZED_TAG = "lowbit_quantized"


def _buffer_prefix(fqn: str) -> str:
    return "_lowbit_" + re.sub(r"[^0-9a-zA-Z_]", "_", fqn)


class RewriteLinears(PassBase):
    def __init__(self, records: Mapping[str, QuantizedLinear]):
        super().__init__()
        self.records = records

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        fake_mode = fake_mode_of(gm)
        factors: dict[int, torch.fx.Node | None] = {}
        modified = False

        def constant(name: str, t: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
            if not hasattr(gm, name):
                gm.register_buffer(name, t)
            with graph.inserting_before(before):
                n = graph.get_attr(name)
            if fake_mode is not None:
                n.meta["val"] = fake_mode.from_tensor(t, static_shapes=True)
            else:
                n.meta["val"] = t
            return n

        first = next(iter(graph.nodes))
        for node, site in linear_sites(gm):
            rec = self.records.get(site.fqn)
            if rec is None:
                continue
            if (rec.out_features, rec.in_features) != (site.out_features, site.in_features):
                raise LowbitError(
                    f"layer {site.fqn} (node {node.name}): the record is {rec.out_features}x{rec.in_features} but "
                    f"the graph's weight is {site.out_features}x{site.in_features}; the checkpoint belongs to "
                    f"another model"
                )
            p = _buffer_prefix(site.fqn)
            x = node.args[0] if node.args else node.kwargs["input"]
            if node.op == "call_module":
                bias = None
                if site.has_bias:
                    with graph.inserting_before(node):
                        bias = graph.get_attr(f"{node.target}.bias")
            else:
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            qw = constant(p + "_qweight", rec.qweight, node)
            sc = constant(p + "_scales", rec.scales, node)
            su = constant(p + "_su", rec.su, node) if rec.su is not None else None
            sv = constant(p + "_sv", rec.sv, node) if rec.sv is not None else None

            def factor_node(n: int) -> torch.fx.Node | None:
                if n not in factors:
                    f = hadamard.factor(n)
                    factors[n] = None if f is None else constant(f"_lowbit_had_{n}", f, first)
                return factors[n]

            had_in = factor_node(rec.in_features) if su is not None else None
            had_out = factor_node(rec.out_features) if sv is not None else None
            with graph.inserting_before(node):
                new = graph.call_function(
                    torch.ops.lowbit.rotated_linear.default,
                    (x, qw, sc, su, sv, had_in, had_out, bias, rec.bits, rec.in_features, rec.group_size),
                )
            new.meta.update({k: v for k, v in node.meta.items() if k != TAG})
            new.meta[QUANTIZED_TAG] = site.fqn
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modified = True
        if modified:
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


def count_quantized(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and n.target is torch.ops.lowbit.rotated_linear.default)
