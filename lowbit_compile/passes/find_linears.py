"""find_linears: tag every linear whose weight is a constant of the model with its module FQN.

Works on the Dynamo graph (weights are placeholders carrying a `grapharg` source), on torch.export graphs
(weights are placeholders named in the graph signature: pass `weight_names`) and on plain FX graphs
(weights are get_attr nodes, or nn.Linear leaf modules called with call_module).
The tag is `node.meta["lowbit_linear"] = LinearSite(...)`. Tagging is metadata only, so the result
reports modified=False.

Names in Dynamo graphs are module paths relative to the module a parameter is reached from (base.source_to_fqn),
so they do not change with how the model is called: torch.compile of the module, of its bound method, of a
function using it, or a forward re-wrapped by a decorator (transformers >= 5.24) all give "model.layers.0...".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .base import LINEAR_TARGETS, PassBase, PassResult, source_to_fqn, weight_source

TAG = "lowbit_linear"


@dataclass(frozen=True)
class LinearSite:
    fqn: str  # the module that calls the linear (e.g. "lm_head"; a tied weight may live elsewhere)
    weight_name: str  # FQN of the weight tensor (e.g. "model.embed_tokens.weight")
    weight_node: str  # graph node holding the weight ("" for an nn.Linear call_module node)
    in_features: int
    out_features: int
    has_bias: bool
    tied: bool  # the weight node also feeds something other than linears (e.g. an embedding)
    module_call: bool = False  # the linear is the forward of an nn.Linear module (lb.quantize plans all of those)


def _linear_module(node: torch.fx.Node) -> str | None:
    """The FQN of the nn.Linear whose forward this linear call is, or None."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        if isinstance(cls, type) and issubclass(cls, torch.nn.Linear):
            return source_to_fqn(path)
    return None


def _module_fqn(node: torch.fx.Node, weight_name: str) -> str:
    module = _linear_module(node)
    if module is not None:
        return module
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def _get_attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape(node: torch.fx.Node):
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is None:
        ga = node.meta.get("grapharg")
        val = getattr(ga, "example", None)
    return None if val is None else tuple(val.shape)


class FindLinears(PassBase):
    def __init__(self, weight_names: Mapping[str, str] | None = None):
        super().__init__()
        self.weight_names = dict(weight_names or {})

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        roots: dict[torch.fx.Node, str] = {}  # linear node -> the root its weight is reached from (Dynamo)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                if type(mod) is torch.nn.Linear:  # plain FX traces keep nn.Linear as a leaf module
                    node.meta[TAG] = LinearSite(
                        fqn=str(node.target), weight_name=f"{node.target}.weight", weight_node="",
                        in_features=mod.in_features, out_features=mod.out_features,
                        has_bias=mod.bias is not None, tied=False, module_call=True,
                    )
                continue
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not isinstance(w, torch.fx.Node):
                continue
            found = weight_source(w, self.weight_names)
            if found is None:
                continue
            name, root = found
            shape = _shape(w)
            if shape is None and w.op == "get_attr":
                shape = tuple(_get_attr(gm, str(w.target)).shape)
            if shape is None or len(shape) != 2:
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            tied = any(u.op != "call_function" or u.target not in LINEAR_TARGETS for u in w.users)
            node.meta[TAG] = LinearSite(
                fqn=_module_fqn(node, name), weight_name=name, weight_node=w.name,
                in_features=shape[1], out_features=shape[0], has_bias=bias is not None, tied=tied,
                module_call=_linear_module(node) is not None,
            )
            roots[node] = root
        _qualify_collisions(roots)
        return PassResult(gm, False)


def _qualify_collisions(roots: dict) -> None:
    """A function that calls two models (`dec(enc(x))`) reaches weights from two roots whose module paths may
    coincide ("0.weight" in both): then every name gets its root in front ("enc.0", "enc.2", "dec.0")."""
    by_name: dict[str, set] = {}
    for node, root in roots.items():
        site = node.meta[TAG]
        by_name.setdefault(site.fqn, set()).add((root, site.weight_name))
    if all(len(v) == 1 for v in by_name.values()):
        return
    for node, root in roots.items():
        site = node.meta[TAG]
        if root:
            node.meta[TAG] = dataclasses.replace(site, fqn=f"{root}.{site.fqn}".rstrip("."),
                                                 weight_name=f"{root}.{site.weight_name}")


def linear_sites(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, LinearSite]]:
    """The tagged linears of a graph, in graph order."""
    return [(n, n.meta[TAG]) for n in gm.graph.nodes if TAG in n.meta]
