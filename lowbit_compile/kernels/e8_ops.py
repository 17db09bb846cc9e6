"""`lowbit::e8p_linear`: a rotated linear whose weight is E8 lattice codes (QuIP#'s E8P, formats/e8p.py).

    y = sv ⊙ F_mᵀ(Ŵ' · F_n(su ⊙ x)) + bias,   Ŵ' = scales ⊙ E8Format(bits).dequantize(codes)

exactly the math of `lowbit::rotated_linear` (reference.rotated_linear_ref) with another decode: `qweight` holds,
per row, one little-endian integer of `bits` bytes per 8 weights (e8p.pack_codes), `scales` one float16 per row.
The op is opaque to the compiler (a custom op, as the reference ops are); its fake allocates a fresh output. On the
CPU the backend runs these records on the native 4-bit kernel instead (the codes as 4-bit digits:
e8p.int4_digits, kernels/cpu_native.py); this op is the oracle that path is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats import e8p
from .reference import linear_fake, rotated_product, rotated_product_grad


def dequantize_e8_weight(qweight: Tensor, scales: Tensor, bits: int, in_features: int) -> Tensor:
    """Packed E8 codes + row scales -> the rotated float32 weight W' (out_features, in_features), on qweight's
    device; equal to E8Format(bits).dequantize(codes) · scales."""
    fmt = e8p.e8_format(bits)
    codes = e8p.unpack_codes(qweight, fmt).long()  # (out, in / 8, stages)
    dev = qweight.device
    v = e8p.codebook().to(dev)[codes[..., 0]]
    if fmt.stages == 2:
        table = e8p.e8_ball() if bits == 3 else e8p.codebook()
        v = v + table.to(dev)[codes[..., 1]] / fmt.ratio
    return v.reshape(qweight.shape[0], in_features) * scales.to(torch.float32)


def e8p_linear_ref(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features):
    """The op in pure torch (the rotations and the order of operations of reference.rotated_linear_ref)."""
    return rotated_product(x, dequantize_e8_weight(qweight, scales, bits, in_features), su, sv, had_in, had_out,
                           bias)


@torch.library.custom_op("lowbit::e8p_linear", mutates_args=())
def e8p_linear(
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
) -> Tensor:
    """y = sv ⊙ H_mᵀ(Ŵ' · H_n(su ⊙ x)) + bias, Ŵ' decoded from packed E8 codes (2/3/4 bits) and float16 row scales."""
    return e8p_linear_ref(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features)


@e8p_linear.register_fake
def _(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features):
    return linear_fake("e8p_linear", x, in_features, qweight.shape[0])


@torch.library.custom_op("lowbit::e8p_weight", mutates_args=())
def e8p_weight(qweight: Tensor, scales: Tensor, bits: int, in_features: int) -> Tensor:
    """The rotated float32 weight W' of packed E8 codes (`dequantize_e8_weight`), as an op: the backward below
    decodes through it, so that tracing the backward (aot autograd) never indexes the codebook with fake codes."""
    return dequantize_e8_weight(qweight, scales, bits, in_features)


@e8p_weight.register_fake
def _(qweight, scales, bits, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


# Autograd: gradients flow to the activations (and bias); the codes are frozen constants (as kernels/ops.py).


def _setup(ctx, inputs, output):
    x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features = inputs
    ctx.save_for_backward(qweight, scales, su, sv, had_in, had_out)
    ctx.meta = (bits, in_features, bias is not None, x.dtype)


def _backward(ctx, grad):
    qweight, scales, su, sv, had_in, had_out = ctx.saved_tensors
    bits, in_features, has_bias, dtype = ctx.meta
    w = e8p_weight(qweight, scales, bits, in_features)
    g, g_bias = rotated_product_grad(grad, w, su, sv, had_in, had_out, has_bias)
    return g.to(dtype), None, None, None, None, None, None, g_bias, None, None


e8p_linear.register_autograd(_backward, setup_context=_setup)
