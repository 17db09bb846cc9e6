"""The `lowbit::` torch.library ops: schema, CPU/generic implementation (the reference for now) and fakes.

Fakes return fresh tensors (never an input), so the schema's no-alias promise holds under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: Tensor, signs: Tensor | None, factor: Tensor | None, inverse: bool = False) -> Tensor:
    """Orthonormal randomized Hadamard on the last dimension: (F ⊗ H_P/√P)(signs ⊙ x); inverse undoes it."""
    return reference.hadamard_ref(x, signs, factor, inverse)


@hadamard.register_fake
def _(x, signs, factor, inverse=False):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit::rotated_linear", mutates_args=())
def rotated_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    su: Tensor | None,
    sv: Tensor | None,
    had_in: Tensor | None,
    had_out: Tensor | None,
    bias: Tensor | None,
    bits: int,
    in_features: int,
    group_size: int,
) -> Tensor:
    """y = sv ⊙ H_mᵀ(Ŵ' · H_n(su ⊙ x)) + bias, Ŵ' decoded from packed `bits`-bit codes and float16 scales."""
    return reference.rotated_linear_ref(x, qweight, scales, su, sv, had_in, had_out, bias, bits,
                                        in_features, group_size)


@rotated_linear.register_fake
def _(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size):
    torch._check(x.shape[-1] == in_features, lambda: f"rotated_linear: input has {x.shape[-1]} features, "
                 f"the weight expects {in_features}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
