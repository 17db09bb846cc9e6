"""The `lowbit::` torch.library ops: schema, device dispatch, fakes and autograd.

Each op is a `torch.library.triton_op` (made by `kernels.triton.triton_op`) whose body is a device branch: CUDA
inputs launch the Triton kernels (`kernels/triton/`, through `wrap_triton`, so torch.compile traces the body and
Inductor sees the kernels); every other device calls the opaque `lowbit::*_reference` custom op, which runs
`reference.py` (Inductor emits an extern call to it, as before the Triton kernels existed).
`register_kernel("cpu")` would not do: torch.compile traces a triton_op's body, not its per-device kernels.
The body doubles as the fake implementation: on fake inputs it allocates fresh outputs (never an input), so the
schema's no-alias promise holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from . import triton as gpu


@torch.library.custom_op("lowbit::hadamard_reference", mutates_args=())
def hadamard_reference(x: Tensor, signs: Tensor | None, factor: Tensor | None, inverse: bool = False) -> Tensor:
    """`lowbit::hadamard` on any device, in pure torch (opaque to the compiler)."""
    return reference.hadamard_ref(x, signs, factor, inverse)


@hadamard_reference.register_fake
def _(x, signs, factor, inverse=False):
    return torch.empty_like(x)


@gpu.triton_op("lowbit::hadamard", mutates_args=())
def hadamard(x: Tensor, signs: Tensor | None, factor: Tensor | None, inverse: bool = False) -> Tensor:
    """Orthonormal randomized Hadamard on the last dimension: (F ⊗ H_P/√P)(signs ⊙ x); inverse undoes it."""
    if gpu.usable(x):
        return gpu.launchers().hadamard(x, signs, factor, inverse)
    return hadamard_reference(x, signs, factor, inverse)


@torch.library.custom_op("lowbit::rotated_linear_reference", mutates_args=())
def rotated_linear_reference(
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
    """`lowbit::rotated_linear` on any device, in pure torch (opaque to the compiler)."""
    return reference.rotated_linear_ref(x, qweight, scales, su, sv, had_in, had_out, bias, bits,
                                        in_features, group_size)


@rotated_linear_reference.register_fake
def _(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size):
    return reference.linear_fake("rotated_linear", x, in_features, qweight.shape[0])


@gpu.triton_op("lowbit::rotated_linear", mutates_args=())
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
    if gpu.usable(x):
        return gpu.launchers().rotated_linear(x, qweight, scales, su, sv, had_in, had_out, bias, bits,
                                              in_features, group_size)
    return rotated_linear_reference(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features,
                                    group_size)


# Autograd: gradients flow to the activations (and bias); packed weights are frozen constants.
# Forward y = A x with A orthonormal, so dx = Aᵀ dy, i.e. the opposite direction of the transform.


def _hadamard_setup(ctx, inputs, output):
    _, signs, factor, inverse = inputs
    ctx.save_for_backward(signs, factor)
    ctx.inverse = inverse


def _hadamard_backward(ctx, grad):
    signs, factor = ctx.saved_tensors
    return torch.ops.lowbit.hadamard(grad, signs, factor, not ctx.inverse), None, None, None


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def _rotated_setup(ctx, inputs, output):
    x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size = inputs
    ctx.save_for_backward(qweight, scales, su, sv, had_in, had_out)
    ctx.meta = (bits, in_features, group_size, bias is not None, x.dtype)


def _rotated_backward(ctx, grad):
    qweight, scales, su, sv, had_in, had_out = ctx.saved_tensors
    bits, in_features, group_size, has_bias, dtype = ctx.meta
    w = reference.dequantize_weight(qweight, scales, bits, in_features, group_size)
    g, g_bias = reference.rotated_product_grad(grad, w, su, sv, had_in, had_out, has_bias)
    return (g.to(dtype), None, None, None, None, None, None, g_bias, None, None, None)


rotated_linear.register_autograd(_rotated_backward, setup_context=_rotated_setup)
