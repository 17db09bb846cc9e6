"""Pass plumbing in the style of torch.fx.passes.infra: `call(gm) -> PassResult(gm, modified)`."""

from __future__ import annotations

import re

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["PassBase", "PassResult", "LINEAR_TARGETS", "source_to_fqn", "fake_mode_of", "get_attr_tensor",
           "add_constant"]

# Linear call targets: the Dynamo graph (torch._C._nn.linear / F.linear) and torch.export (aten.linear).
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]\.?")


def source_to_fqn(name: str) -> str:
    """Dynamo source / module-stack strings -> dotted FQN.

    "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']" -> "model.layers.0.weight"
    "L['self'].model.layers[0].q_proj" -> "model.layers.0.q_proj"
    """
    s = _ROOT.sub("", name)
    s = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"^_(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r"\1", s)
    s = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", s)
    return s.strip(".")


def fake_mode_of(gm: torch.fx.GraphModule):
    """The FakeTensorMode the graph's meta["val"] tensors belong to, or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def get_attr_tensor(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr node reads (a dotted target walked from gm), or None for anything else."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def add_constant(gm: torch.fx.GraphModule, name: str, t: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """Register `t` as buffer `name` of gm (once) and read it with a get_attr node inserted before `before`;
    meta["val"] is a fake tensor of the graph's fake mode (or t itself when the graph has none)."""
    if not hasattr(gm, name):
        gm.register_buffer(name, t)
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(name)
    fake_mode = fake_mode_of(gm)
    n.meta["val"] = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
    return n
