"""Pass plumbing in the style of torch.fx.passes.infra: `call(gm) -> PassResult(gm, modified)`."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["PassBase", "PassResult", "LINEAR_TARGETS", "QUANTIZED_TAG", "RUNTIME", "KERNEL_REASON", "FOLD",
           "source_to_fqn", "source_root", "fake_mode_of", "get_attr_tensor", "add_constant", "buffer_prefix",
           "layer_meta", "weight_source"]

# What the passes leave in node.meta of a lowbit linear op (the backend's report is built from these):
QUANTIZED_TAG = "lowbit_quantized"  # the layer's FQN
RUNTIME = "lowbit_runtime"  # the op it runs and the bits per weight it holds in memory
KERNEL_REASON = "lowbit_kernel_reason"  # why that CPU kernel (integer layers: kernels/cpu_caps.py)
FOLD = "lowbit_fold"  # FP4 W4A4: where its activation exponents went (passes/fold_act_scales.py)

# Linear call targets: the Dynamo graph (torch._C._nn.linear / F.linear) and torch.export (aten.linear).
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)

# A Dynamo source or module-stack string: a root (L['x'] for a local, G['x'] for a global), then `.attr` and
# `[key]` steps. What names the root changes with how the model is called (L['self'], L['fn'], L['fn'].__self__,
# L['args'][0] when a decorator wraps forward, G['model'], a closure's L['m']); the module path does not.
_ROOT_RE = re.compile(r"^(?:L|G)\[(['\"])(?P<name>.+?)\1\]")
_STEP_RE = re.compile(r"\.(?P<attr>[A-Za-z0-9_]+)|\[(?P<q>['\"])(?P<key>.*?)(?P=q)\]|\[(?P<index>-?\d+)\]")
_MODULE_DICTS = ("_modules", "_parameters", "_buffers")


def _steps(name: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(root name, [(kind, key)...]) with kind "attr" or "item"; None when `name` is not a source string."""
    m = _ROOT_RE.match(name)
    root, pos = (m.group("name"), m.end()) if m else ("", 0)
    steps = []
    while pos < len(name):
        m = _STEP_RE.match(name, pos)
        if m is None:
            return None
        steps.append(("attr", m.group("attr")) if m.group("attr") else ("item", m.group("key") or m.group("index")))
        pos = m.end()
    return root, steps


def weight_source(node: torch.fx.Node, weight_names: Mapping[str, str]) -> tuple[str, str] | None:
    """(FQN of the weight relative to the module it is reached from, that root's name) or None."""
    if node.op == "get_attr":
        return str(node.target), ""
    if node.op != "placeholder":
        return None
    if node.name in weight_names:
        return weight_names[node.name], ""
    ga = node.meta.get("grapharg")
    if ga is not None and isinstance(getattr(ga, "example", None), torch.nn.Parameter):
        return source_to_fqn(ga.source.name), source_root(ga.source.name)
    return None


def source_root(name: str) -> str:
    """The root a source string starts from ("self", "args", "model", ...); "" for a plain dotted path."""
    parsed = _steps(name)
    return parsed[0] if parsed else ""


def source_to_fqn(name: str) -> str:
    """Dynamo source / module-stack strings -> dotted FQN relative to the module the path walks from.

    "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']" -> "model.layers.0.weight"
    "L['args'][0]._modules['lm_head']._parameters['weight']"                          -> "lm_head.weight"
    "L['fn'].__self__._modules['0']._parameters['weight']"                            -> "0.weight"
    "L['self'].model.layers[0].q_proj"                                                 -> "model.layers.0.q_proj"
    "model.layers.0.q_proj" (torch.export module stacks)                               -> unchanged

    The module path starts at the first `_modules` / `_parameters` / `_buffers` lookup; without one (attribute
    spelling), after the root and the steps that only reach the root object (an index into `args`, `__self__`,
    `__func__`, `__wrapped__`, closure cells).
    """
    parsed = _steps(name)
    if parsed is None:
        return name.strip(".")
    root, steps = parsed
    first = next((i for i, (kind, key) in enumerate(steps) if kind == "attr" and key in _MODULE_DICTS), None)
    if first is None:
        i = 0
        if root:  # skip the steps that reach the root object
            while i < len(steps) and (steps[i][0] == "item" and steps[i][1].lstrip("-").isdigit()
                                      or steps[i][1].startswith("__") or steps[i][1] == "cell_contents"):
                i += 1
        first = i
    return ".".join(key for kind, key in steps[first:] if not (kind == "attr" and key in _MODULE_DICTS))


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
    """Register `t` as buffer `name` of gm (once; a tensor that is already one of our buffers keeps its name) and
    read it with a get_attr node inserted before `before`; meta["val"] is a fake tensor of the graph's fake mode (or
    t itself when the graph has none)."""
    same = next((n for n, b in gm.named_buffers(remove_duplicate=False) if b is t and n.startswith("_lowbit_")), None)
    if same is not None:  # the very tensor is a buffer already (a tied head's codes, an embedding's): read that one
        name = same
    elif not hasattr(gm, name):
        gm.register_buffer(name, t)
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(name)
    fake_mode = fake_mode_of(gm)
    n.meta["val"] = fake_mode.from_tensor(t, static_shapes=True) if fake_mode is not None else t
    return n


def buffer_prefix(fqn: str) -> str:
    """The prefix of the graph buffers a pass adds for a layer: `_lowbit_` + the FQN with non-identifier
    characters replaced."""
    return "_lowbit_" + re.sub(r"[^0-9a-zA-Z_]", "_", fqn)


def layer_meta(gm: torch.fx.GraphModule) -> dict[str, dict]:
    """{layer FQN: what the passes left in its op node's meta (RUNTIME, KERNEL_REASON, FOLD)}, from the final graph."""
    out: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if QUANTIZED_TAG in node.meta:
            out.setdefault(node.meta[QUANTIZED_TAG], {}).update(
                {k: node.meta[k] for k in (RUNTIME, KERNEL_REASON, FOLD) if k in node.meta})
    return out
