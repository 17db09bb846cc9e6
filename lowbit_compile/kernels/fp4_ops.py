"""`lowbit::fp4_linear`: an LLM-FP4 linear (FP4 weights, optionally FP4 activations); reference and device branch.

    y = Q_a(x ⊙ 2**k) · Ŵ'ᵀ + bias,   Ŵ' = decode(codes) ⊙ w_scales (per row)

Arguments (the stored representation of `quantize.fp4.FP4LinearQuant`):
- x          (..., in_features), any float dtype; computed in float32, returned in x.dtype
- qweight    uint8 (out_features, ceil(in_features / 2)): FP4 codes of W' = W·2**-k, two per byte,
             element 0 in the low nibble
- w_scales   float16 (out_features, 1): per-row scale 2**-bias
- act_shift  uint8 (in_features,): per-channel exponents k, x is multiplied by 2**k before quantization;
             None once a graph pass folded the shift into the producer of x
- act_scale  float16 (1,): per-tensor activation scale 2**-ρ; None in W4A16 mode
- w_format   "e2m1" | "e1m2" | "e3m0"
- a_format   the activation format, or None for W4A16 (activations stay float)
- bias       float (out_features,) or None
- in_features  the true number of input features (the packed length rounds up to whole bytes)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LowbitError
from ..formats import fp4 as f4
from . import triton as gpu
from .reference import linear_fake


def dequantize_fp4_weight(qweight: Tensor, w_scales: Tensor, w_format: str, in_features: int) -> Tensor:
    """Packed FP4 codes + per-row scales -> Ŵ' float32 (out_features, in_features)."""
    codes = f4.unpack_codes(qweight, in_features)
    return f4.decode(codes, f4.fp4_format(w_format), w_scales.reshape(-1, 1))


def quantize_fp4_activations(x: Tensor, act_shift: Tensor | None, act_scale: Tensor | None,
                             a_format: str | None, rounding=f4.quantize) -> Tensor:
    """x (float32) ⊙ 2**k, rounded to the activation format per tensor (not rounded if a_format is None).
    `rounding(x, fmt, scale)`: formats.fp4.quantize, or a function with its values (quantize.fp4.round_fp4)."""
    if act_shift is not None:
        x = x * f4.exponent_multipliers(act_shift)
    if a_format is None:
        return x
    if act_scale is None:
        raise LowbitError(f"fp4_linear: activation format {a_format!r} needs act_scale (None means W4A16: "
                          f"pass a_format=None)")
    return rounding(x, f4.fp4_format(a_format), act_scale.reshape(()))


def fp4_linear_decoded(x, w, act_shift, act_scale, a_format, bias, rounding=f4.quantize):
    """fp4_linear_ref after its weight decode: y = Q_a(x ⊙ 2**k) · wᵀ + bias with w the decoded Ŵ' (float32)."""
    h = quantize_fp4_activations(x.to(torch.float32), act_shift, act_scale, a_format, rounding)
    y = torch.nn.functional.linear(h, w)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def fp4_linear_ref(x, qweight, w_scales, act_shift, act_scale, w_format, a_format, bias, in_features):
    if x.shape[-1] != in_features:
        raise LowbitError(f"fp4_linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    w = dequantize_fp4_weight(qweight, w_scales, w_format, in_features)
    return fp4_linear_decoded(x, w, act_shift, act_scale, a_format, bias)


@torch.library.custom_op("lowbit::fp4_linear_reference", mutates_args=())
def fp4_linear_reference(
    x: Tensor,
    qweight: Tensor,
    w_scales: Tensor,
    act_shift: Tensor | None,
    act_scale: Tensor | None,
    w_format: str,
    a_format: str | None,
    bias: Tensor | None,
    in_features: int,
) -> Tensor:
    """`lowbit::fp4_linear` on any device, in pure torch (opaque to the compiler)."""
    return fp4_linear_ref(x, qweight, w_scales, act_shift, act_scale, w_format, a_format, bias, in_features)


@fp4_linear_reference.register_fake
def _(x, qweight, w_scales, act_shift, act_scale, w_format, a_format, bias, in_features):
    return linear_fake("fp4_linear", x, in_features, qweight.shape[0])


@gpu.triton_op("lowbit::fp4_linear", mutates_args=())
def fp4_linear(
    x: Tensor,
    qweight: Tensor,
    w_scales: Tensor,
    act_shift: Tensor | None,
    act_scale: Tensor | None,
    w_format: str,
    a_format: str | None,
    bias: Tensor | None,
    in_features: int,
) -> Tensor:
    """y = Q_a(x ⊙ 2**act_shift) · Ŵ'ᵀ + bias with FP4 weights (see the module docstring).

    A triton_op with a device branch, like the ops in `ops.py`: Triton kernel on CUDA, the opaque
    `lowbit::fp4_linear_reference` elsewhere.
    """
    if gpu.usable(x):
        return gpu.launchers().fp4_linear(x, qweight, w_scales, act_shift, act_scale, w_format, a_format, bias,
                                          in_features)
    return fp4_linear_reference(x, qweight, w_scales, act_shift, act_scale, w_format, a_format, bias, in_features)
