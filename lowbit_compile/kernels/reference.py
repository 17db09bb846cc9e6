"""Pure-torch reference implementations of the lowbit ops: the oracle every fast path is tested against."""

from __future__ import annotations

import torch

from .. import formats, hadamard


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed in float64 (tests, gradcheck); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_fake(op: str, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The fake (register_fake) of every lowbit linear op: checks x's last dimension, returns (..., out)."""
    torch._check(x.shape[-1] == in_features, lambda: f"{op}: input has {x.shape[-1]} features, "
                 f"the weight expects {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def hadamard_ref(x: torch.Tensor, signs: torch.Tensor | None, factor: torch.Tensor | None,
                 inverse: bool = False) -> torch.Tensor:
    dt = compute_dtype(x)
    y = hadamard.apply(x.to(dt), None if signs is None else signs.to(dt), factor, inverse)
    return y.to(x.dtype)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int,
                      group_size: int) -> torch.Tensor:
    """Packed codes + scales -> the rotated float32 weight W' (out_features, in_features)."""
    codes = formats.unpack(qweight, bits, in_features)
    return formats.dequantize(codes, scales, formats.int_format(bits), group_size)


def rotated_linear_ref(x, qweight, scales, su, sv, had_in, had_out, bias, bits, in_features, group_size):
    """y = Uᵀ Ŵ' V x + b with V = had_in·diag(su), U = had_out·diag(sv) (see quantize/incoherence.py).

    su None: no input transform; sv None: no output transform (plain low-bit linear when both are None).
    """
    return rotated_product(x, dequantize_weight(qweight, scales, bits, in_features, group_size), su, sv, had_in,
                           had_out, bias)


def rotated_product_grad(grad, w, su, sv, had_in, had_out, has_bias: bool):
    """(dL/dx in the compute dtype, dL/dbias or None) of `rotated_product` for a frozen W: dz = U dy, dh = dz W,
    dx = Vᵀ dh."""
    dt = compute_dtype(grad)
    g = grad.to(dt)
    g_bias = g.reshape(-1, g.shape[-1]).sum(0) if has_bias else None
    if sv is not None:
        g = hadamard.apply(g, sv.to(dt), had_out)
    g = g @ w.to(dt)
    if su is not None:
        g = hadamard.apply(g, su.to(dt), had_in, inverse=True)
    return g, g_bias


def rotated_product(x, w, su, sv, had_in, had_out, bias):
    """y = Uᵀ W V x + b for a decoded float weight W (any record kind's), in the compute dtype of x."""
    dt = compute_dtype(x)
    w = w.to(dt)
    h = x.to(dt)
    if su is not None:
        h = hadamard.apply(h, su.to(dt), had_in)
    y = torch.nn.functional.linear(h, w)
    if sv is not None:
        y = hadamard.apply(y, sv.to(dt), had_out, inverse=True)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)
