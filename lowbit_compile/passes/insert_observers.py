"""insert_observers: put a pass-through observer in front of every tagged linear's input.

Running the graph then accumulates each linear's Hessian H = E[x xᵀ] (float64) and per-channel max |x|
(calibrate.HessianAccumulator). Linears fed by the same node share one observer. `remove_observers`
restores the graph exactly. Used by the backend to calibrate on the first call's inputs.
"""

from __future__ import annotations

import torch

from ..calibrate import HessianAccumulator
from .base import PassBase, PassResult
from .find_linears import linear_sites

OBSERVER_PREFIX = "_lowbit_observer_"


class Observer(torch.nn.Module):
    def __init__(self, n: int, name: str):
        super().__init__()
        self.acc = HessianAccumulator(n, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.acc.add(x)
        return x


class InsertObservers(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        by_input: dict[torch.fx.Node, torch.fx.Node] = {}
        for node, site in linear_sites(gm):
            x = node.args[0]
            if x not in by_input:
                name = f"{OBSERVER_PREFIX}{len(by_input)}"
                gm.add_module(name, Observer(site.in_features, site.fqn))
                with gm.graph.inserting_after(x):
                    by_input[x] = gm.graph.call_module(name, (x,))
                by_input[x].meta = dict(x.meta)
            node.replace_input_with(x, by_input[x])
        if by_input:
            gm.recompile()
        return PassResult(gm, bool(by_input))


def observed_stats(gm: torch.fx.GraphModule) -> dict[str, HessianAccumulator]:
    """fqn of each tagged linear -> the accumulator that observed its input."""
    out = {}
    for node, site in linear_sites(gm):
        x = node.args[0]
        if x.op == "call_module" and str(x.target).startswith(OBSERVER_PREFIX):
            out[site.fqn] = gm.get_submodule(str(x.target)).acc
    return out


def remove_observers(gm: torch.fx.GraphModule) -> PassResult:
    removed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            delattr(gm, str(node.target))
            removed = True
    if removed:
        gm.recompile()
    return PassResult(gm, removed)
