"""The pass manager: runs one ordered list of passes over a graph with an explicit context, like ExecuTorch's
XNNPACK pass manager. Each pass is built from the context (`from_context(ctx)`) and leaves what it did in the
meta of the nodes it made (passes/base.py: RUNTIME, KERNEL_REASON, FOLD); `layer_meta(gm)` reads it back.
A pass that fails is named, with the passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LowbitError
from .base import PassBase, PassResult


@dataclass
class PassContext:
    """What the passes need besides the graph."""

    records: Mapping = field(default_factory=dict)  # fqn -> QuantizedLinear | FP4QuantizedLinear (rewrite_linears)
    kernels: str = "reference"  # "auto": CPU kernels chosen by capability (rewrite_linears, fp4_fast_path)
    constants: Mapping[str, torch.Tensor] | None = None  # placeholder name -> value (fold_act_scales, torch.export)


class PassManager:
    def __init__(self, passes: Sequence[type[PassBase]]):
        self.passes = tuple(passes)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        modified, done = False, []
        for cls in self.passes:
            p = cls.from_context(ctx) if hasattr(cls, "from_context") else cls()
            try:
                result = p(gm)
            except LowbitError:
                raise
            except Exception as e:  # a bug or an unexpected graph: say where, keep the cause
                after = f" (after {', '.join(done)})" if done else ""
                raise LowbitError(f"graph pass {cls.__name__} failed{after}: {type(e).__name__}: {e}") from e
            gm, modified = result.graph_module, modified or result.modified
            done.append(cls.__name__)
        return PassResult(gm, modified)

    def __repr__(self) -> str:
        return f"PassManager({' -> '.join(p.__name__ for p in self.passes)})"
