"""One named argument spec per `lowbit::` op, read from the op's own schema: passes and modules build and read op
calls by argument name, never by position, so adding an argument to an op cannot silently shift another.

    FP4_LINEAR.node(graph, x=x, qweight=q, ...)        a call node, every argument by keyword
    FP4_LINEAR.args_of(node)["act_shift"]              an argument of a call node, however it was built
    FP4_LINEAR.update(node, act_shift=None)            change arguments of a call node in place
    FP4_LINEAR(x=x, qweight=q, ...)                    call the op by keywords

A spec refuses a name its op does not have, and a node missing a required argument, saying which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class Shared:
    """An argument value that every call with the same `name` shares (a transform factor of one size): a graph
    holds it once."""

    name: str
    value: torch.Tensor | None


def unshared(v):
    return v.value if isinstance(v, Shared) else v


@dataclass(frozen=True)
class OpSpec:
    qualname: str  # "lowbit::fp4_linear"

    @property
    def op(self) -> torch._ops.OpOverload:
        namespace, name = self.qualname.split("::")
        return getattr(getattr(torch.ops, namespace), name).default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.op._schema.arguments)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The arguments typed Tensor or Tensor? (a module holds them as buffers)."""
        def is_tensor(t) -> bool:
            t = t.getElementType() if isinstance(t, torch._C.OptionalType) else t
            return isinstance(t, torch._C.TensorType)

        return tuple(a.name for a in self.op._schema.arguments if is_tensor(a.type))

    def _check(self, names) -> None:
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise LowbitError(f"{self.qualname} has no argument(s) {unknown}; its arguments: {list(self.names)}")

    def _complete(self, values: dict) -> dict:
        out = {}
        for a in self.op._schema.arguments:
            if a.name in values:
                out[a.name] = values[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                raise LowbitError(f"{self.qualname}: argument {a.name!r} is missing")
        return out

    def is_call(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is self.op

    def args_of(self, node: torch.fx.Node) -> dict:
        """{argument name: value} of a call node of this op, built positionally or by keyword."""
        if not self.is_call(node):
            raise LowbitError(f"node {getattr(node, 'name', node)} is not a call of {self.qualname}")
        return self._complete({**dict(zip(self.names, node.args)), **node.kwargs})

    def node(self, graph: torch.fx.Graph, **kwargs) -> torch.fx.Node:
        """A call node with every argument given by keyword (at the graph's insertion point)."""
        self._check(kwargs)
        return graph.call_function(self.op, (), self._complete(kwargs))

    def update(self, node: torch.fx.Node, **changes) -> None:
        """Replace some arguments of a call node; the node then holds every argument by keyword."""
        self._check(changes)
        values = {**self.args_of(node), **changes}
        node.args, node.kwargs = (), values

    def __call__(self, **kwargs):
        self._check(kwargs)
        return self.op(**kwargs)


HADAMARD = OpSpec("lowbit::hadamard")
ROTATED_LINEAR = OpSpec("lowbit::rotated_linear")
FP4_LINEAR = OpSpec("lowbit::fp4_linear")
INT4PACK_LINEAR = OpSpec("lowbit::int4pack_linear")
FP4PACK_LINEAR = OpSpec("lowbit::fp4pack_linear")
NATIVE_LINEAR = OpSpec("lowbit::native_linear")
E8P_LINEAR = OpSpec("lowbit::e8p_linear")
LINEAR_OPS = (ROTATED_LINEAR, FP4_LINEAR, INT4PACK_LINEAR, FP4PACK_LINEAR, NATIVE_LINEAR, E8P_LINEAR)
EMBEDDING = OpSpec("lowbit::embedding")
