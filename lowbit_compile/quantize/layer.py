"""Quantize one linear weight: dispatch on the layer spec, return a QuantizedLinear record."""


from __future__ import annotations

import torch

from .. import formats
from ..checkpoint import QuantizedLinear
from ..errors import LowbitError
from ..recipe import LayerSpec
from .incoherence import Transform, layer_seed
from .rtn import quantize_rtn


def check_weight(fqn: str, w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise LowbitError(f"layer {fqn}: expected a 2-D linear weight, got shape {tuple(w.shape)}")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise LowbitError(
            f"layer {fqn}: weight has {n_nan} NaN and {n_inf} Inf values; fix the model weights, or keep the "
            f"layer in float with overrides={{{fqn!r}: None}}"
        )


def quantize_weight(fqn: str, w: torch.Tensor, spec: LayerSpec, seed: int = 0,
                    hessian: torch.Tensor | None = None) -> QuantizedLinear:
    """Quantize one linear weight (out_features, in_features); LDLQ methods need its input Hessian."""
    check_weight(fqn, w)
    if spec.needs_calibration:
        if hessian is None:
            raise LowbitError(f"layer {fqn}: method {spec.method!r} needs calibration data (an input Hessian)")
        from .quip import quantize_quip

        return quantize_quip(w.detach(), hessian, spec.bits, spec.group_size, rotate=spec.rotate, seed=seed,
                             rescale=spec.rescale, greedy=spec.greedy, damp=spec.damp, fqn=fqn)
    w = w.detach().to(torch.float32)
    out_f, in_f = w.shape
    fmt = formats.int_format(spec.bits)
    formats.num_groups(in_f, spec.group_size)  # validates the group size against this layer
    transform, s = None, None
    if spec.rotate:
        s = layer_seed(seed, fqn)
        try:
            transform = Transform.from_seed(in_f, out_f, s)
        except LowbitError as e:
            raise LowbitError(f"layer {fqn}: {e}") from None
    w_rot = transform.rotate_weight(w) if transform else w
    codes, scales = quantize_rtn(w_rot, fmt, spec.group_size)
    rec = QuantizedLinear(
        fqn=fqn, method=spec.method, bits=spec.bits, in_features=in_f, out_features=out_f,
        group_size=spec.group_size, qweight=formats.pack(codes, spec.bits), scales=scales, seed=s,
        su=transform.su if transform else None, sv=transform.sv if transform else None, weight_error=0.0,
    )
    err = torch.linalg.vector_norm(rec.dequantized_weight() - w) / torch.linalg.vector_norm(w).clamp_min(1e-30)
    rec.weight_error = float(err)
    return rec

