"""Module form of a quantized linear, for torch.export-based paths (ExecuTorch, ONNX) and eager use.

`swap_linears(model, records)` replaces each named nn.Linear by a LowbitLinear whose buffers are the packed
record and whose forward is one `lowbit::rotated_linear` call. Tied weights stay with the module that
still uses them (an embedding keeps its float weight when a tied lm_head is swapped).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from . import hadamard, kernels  # noqa: F401  (registers the ops)
from .checkpoint import QuantizedLinear
from .errors import LowbitError


class LowbitLinear(torch.nn.Module):
    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.fqn = rec.fqn
        self.in_features, self.out_features = rec.in_features, rec.out_features
        self.bits, self.group_size = rec.bits, rec.group_size
        self.register_buffer("qweight", rec.qweight.clone())
        self.register_buffer("scales", rec.scales.clone())
        rotated = rec.su is not None
        self.register_buffer("su", rec.su.clone() if rotated else None)
        self.register_buffer("sv", rec.sv.clone() if rec.sv is not None else None)
        self.register_buffer("had_in", hadamard.factor(rec.in_features) if rotated else None)
        self.register_buffer("had_out", hadamard.factor(rec.out_features) if rec.sv is not None else None)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowbit.rotated_linear(x, self.qweight, self.scales, self.su, self.sv, self.had_in,
                                               self.had_out, self.bias, self.bits, self.in_features,
                                               self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, rotated={self.su is not None}")


def swap_linears(model: torch.nn.Module, records: Mapping[str, QuantizedLinear], inplace: bool = False):
    """Replace each nn.Linear named in `records` by a LowbitLinear (on a deep copy unless inplace)."""
    if not inplace:
        model = copy.deepcopy(model)
    for fqn, rec in records.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise LowbitError(f"layer {fqn}: no such module in this model; the checkpoint belongs to another "
                              f"model") from None
        if not isinstance(old, torch.nn.Linear):
            raise LowbitError(f"layer {fqn}: expected nn.Linear, found {type(old).__name__}")
        if (old.out_features, old.in_features) != (rec.out_features, rec.in_features):
            raise LowbitError(f"layer {fqn}: the model's weight is {old.out_features}x{old.in_features}, the "
                              f"record is {rec.out_features}x{rec.in_features}; the checkpoint belongs to another "
                              f"model")
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowbitLinear(rec, old.bias))
    return model
