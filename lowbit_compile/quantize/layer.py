"""Quantize one linear weight: dispatch on the layer spec, return a QuantizedLinear, E8QuantizedLinear (method "e8",
registered here) or FP4QuantizedLinear.

FP4 layers that read the same input tensor (q/k/v, gate/up) are quantized together by `quantize_fp4_group`,
so that they share one vector of per-channel activation exponents: then a single folded copy of their
producer (a norm's weight) serves all of them.
"""


from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from .. import formats
from ..errors import LowbitError
from ..formats import fp4 as f4
from ..formats.e8p import DIM as E8_DIM
from ..formats.e8p import E8_BITS
from ..recipe import LayerSpec, parse_spec, register_method
from .incoherence import Transform, layer_seed
from .records import FP4QuantizedLinear, QuantizedLinear, weight_digest
from .rtn import quantize_rtn

register_method("e8", "QuIP#'s E8P: incoherence + block LDLQ with the E8 lattice codebook (2-bit; 3/4-bit residual)",
                rotate=True, needs_calibration=True, bits=E8_BITS, grouped=False, tunable=True, bias_correct=True,
                fmt="e8p{bits}")


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


def check_group_size(fqn: str, in_features: int, spec: LayerSpec) -> None:
    """Refuse a group size that does not divide the layer's in_features, naming the layer and the fixes: a
    per-layer override with a group size that divides it (the largest one up to the asked size), or one scale
    per output channel. E8 codes hold groups of 8 inputs: a width that 8 does not divide takes a scalar recipe."""
    if spec.method == "e8" and in_features % E8_DIM:
        scalar = _recipe_text(LayerSpec(bits=spec.bits, method="quip", rotate=True))
        raise LowbitError(f"layer {fqn}: E8 codes quantize {E8_DIM} input columns at a time, but in_features="
                          f"{in_features} is not a multiple of {E8_DIM}; give this layer a scalar recipe: "
                          f"overrides={{{fqn!r}: {scalar}}} (lb.quantize(..., overrides=...) or the torch.compile "
                          f"option 'overrides')")
    g = spec.group_size
    if spec.method == "fp4" or g == 0 or in_features % g == 0:
        return
    per_channel = dataclasses.replace(spec, group_size=0)
    fixes = [f"one scale per output channel (group_size=0): overrides={{{fqn!r}: {_recipe_text(per_channel)}}}"]
    d = next(d for d in range(min(g, in_features), 0, -1) if in_features % d == 0)
    if d > 1:
        fixes.insert(0, f"a group size that divides it: overrides={{{fqn!r}: "
                        f"{_recipe_text(dataclasses.replace(spec, group_size=d))}}}")
    raise LowbitError(f"layer {fqn}: group size {g} does not divide in_features={in_features}; give this layer "
                      f"{', or '.join(fixes)} (lb.quantize(..., overrides=...) or the torch.compile option "
                      f"'overrides'), or use a recipe whose group size divides every layer's in_features")


def _recipe_text(spec: LayerSpec) -> str:
    """The recipe string of `spec` when one parses back to it exactly, else the LayerSpec itself."""
    name = f"w{spec.bits}" + ("" if spec.method == "rtn" and spec.rotate else
                              "-rtn" if spec.method == "rtn" else f"-{spec.method}")
    name += (f"-g{spec.group_size}" if spec.group_size else "") + ("-ft" if spec.finetune else "")
    try:
        same = parse_spec(name) == spec
    except LowbitError:
        same = False
    return repr(name) if same else repr(spec)


def quantize_weight(fqn: str, w: torch.Tensor, spec: LayerSpec, seed: int = 0,
                    hessian: torch.Tensor | None = None, sample: torch.Tensor | None = None,
                    absmax: torch.Tensor | None = None, spaces: dict | None = None,
                    ) -> QuantizedLinear | FP4QuantizedLinear:
    """Quantize one linear weight (out_features, in_features); LDLQ methods need its input Hessian, FP4 a
    sample of its inputs (and optionally the per-channel max |x| over all calibration tokens). The record
    keeps the weight's digest, so a checkpoint can find its layer whatever a graph names it. `spaces`: a dict
    kept across several specs of the same (w, hessian), so QuIP/OPTQ rotate and factor the layer once
    (quip.quantize_quip)."""
    rec = _quantize_weight(fqn, w, spec, seed, hessian, sample, absmax, spaces)
    rec.weight_sha256 = weight_digest(w)
    return rec


def _quantize_weight(fqn, w, spec, seed, hessian, sample, absmax, spaces=None):
    check_weight(fqn, w)
    check_group_size(fqn, w.shape[1], spec)
    if spec.method == "fp4":
        return quantize_fp4_group({fqn: (w, spec)}, sample, absmax, seed)[fqn]
    if spec.needs_calibration:
        if hessian is None:
            raise LowbitError(f"layer {fqn}: method {spec.method!r} needs calibration data (an input Hessian)")
        if spec.method == "e8":
            from .e8 import quantize_e8_linear

            return quantize_e8_linear(w.detach(), hessian, spec.bits, seed=seed, damp=spec.damp, fqn=fqn)
        from .quip import quantize_quip

        return quantize_quip(w.detach(), hessian, spec.bits, spec.group_size, rotate=spec.rotate, seed=seed,
                             rescale=spec.rescale, greedy=spec.greedy, damp=spec.damp, fqn=fqn, spaces=spaces)
    w = w.detach().to(torch.float32)
    out_f, in_f = w.shape
    fmt = formats.int_format(spec.bits)
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



# ----------------------------------------------------------------------------- FP4


def _fp4_record(res, w: torch.Tensor, method: str, su=None, seed=None) -> FP4QuantizedLinear:
    rec = FP4QuantizedLinear(
        fqn=res.fqn, method=method, w_format=res.w_format.name,
        a_format=None if res.a_format is None else res.a_format.name,
        in_features=res.in_features, out_features=res.out_features, qweight=res.qweight,
        w_scales=res.w_scales, act_scale=res.act_scale, weight_error=0.0,
        act_exponents=None if res.act_exponents is None else res.act_exponents.clone(),  # groups share k
        proxy_loss=_finite_or_none(res.loss), baseline_loss=_finite_or_none(res.baseline_loss),
        notes=list(res.notes), su=None if su is None else su.clone(), seed=seed, weight_sha256=weight_digest(w),
    )
    w = w.detach().to(torch.float32)
    err = torch.linalg.vector_norm(rec.dequantized_weight() - w) / torch.linalg.vector_norm(w).clamp_min(1e-30)
    rec.weight_error = float(err)
    return rec


def _finite_or_none(v: float) -> float | None:
    return float(v) if v == v and abs(v) != float("inf") else None


def quantize_fp4_group(layers: Mapping[str, tuple[torch.Tensor, LayerSpec]], sample: torch.Tensor | None,
                       absmax: torch.Tensor | None = None, seed: int = 0) -> dict[str, FP4QuantizedLinear]:
    """FP4-quantize linears that read the same input, given a sample of that input (tokens, in_features).

    W4A4 layers with searched per-channel exponents share one exponent vector k: for each activation
    format f, k_f = channel_exponents(max |x| per channel, f) (over all calibration tokens when `absmax`
    is given, else over the sample) and every layer is searched with k_f and format f; the f with the
    smallest summed relative output error (loss / mean y²) wins for the whole group. With one layer this is
    exactly the per-layer LLM-FP4 search. Other FP4 specs (W4A16, max-scaled, no exponents) are per layer.
    Rotated specs (fp4-rot) share one randomized Hadamard V (seeded by the recipe seed and the group's
    first layer): they are searched on (V x, W Vᵀ), and their exponents, if any, are on rotated channels.
    """
    from . import fp4 as q

    names = ", ".join(layers)
    if sample is None:
        raise LowbitError(f"layer(s) {names}: FP4 needs calibration data (a sample of the layer inputs); pass "
                          f"calibration=... to lb.quantize, or compile without a checkpoint to calibrate on the "
                          f"first call")
    for fqn, (w, _) in layers.items():
        check_weight(fqn, w)
    x = sample.detach().to(torch.float32)
    x = x.reshape(-1, x.shape[-1])
    for fqn, (w, _) in layers.items():
        q.check_inputs(fqn, x, w)  # names the layer and channel before anything is computed from x
    out: dict[str, FP4QuantizedLinear] = {}
    plain = {f: v for f, v in layers.items() if not v[1].rotate}
    rotated = {f: v for f, v in layers.items() if v[1].rotate}
    if plain:
        for f, (res, method) in _fp4_search_group(plain, x, absmax).items():
            out[f] = _fp4_record(res, layers[f][0], method)
    if rotated:
        from .. import hadamard

        s = layer_seed(seed, next(iter(rotated)))
        su, had = hadamard.random_signs(x.shape[1], s), hadamard.factor(x.shape[1])
        xr = hadamard.apply(x, su, had)
        wr = {f: (hadamard.apply(w.detach().to(torch.float32), su, had), spec) for f, (w, spec) in rotated.items()}
        for f, (res, method) in _fp4_search_group(wr, xr, None).items():
            out[f] = _fp4_record(res, layers[f][0], method, su, s)
    return {f: out[f] for f in layers}


def _fp4_search_group(layers, x: torch.Tensor, absmax: torch.Tensor | None) -> dict:
    """The searches of `quantize_fp4_group` for layers reading one input x: {fqn: (FP4LinearQuant, method)}."""
    from . import fp4 as q

    out = {}
    shared = {}
    caches: dict = {}  # quantized activations per format, shared by the layers searched without shifts (x' = x)
    for fqn, (w, spec) in layers.items():
        if spec.act_quant and spec.fp4_search and spec.act_exponents:
            shared[fqn] = w
        elif not spec.fp4_search:
            out[fqn] = (q.max_scaled_fp4(x, w, fqn=fqn, act_quant=spec.act_quant), "max-scaled")
        else:
            res = q.search_fp4_layer(x, w, fqn=fqn, act_quant=spec.act_quant, channel_shift=False,
                                     clip_grid=q.CLIP_GRID, rounds=q.SEARCH_ROUNDS, act_caches=caches)
            out[fqn] = (res, "search")
    if shared:
        amax = (absmax if absmax is not None else x.abs().amax(dim=0)).to(torch.float32)
        y64 = {f: x.double() @ w.detach().double().T for f, w in shared.items()}
        energy = {f: float(y.pow(2).mean()) for f, y in y64.items()}
        # Each activation format is screened on every layer of the group (quantize.fp4.screen_format); the ones
        # whose summed screened error is within ACT_FORMAT_MARGIN of the best are searched, each layer in the
        # weight formats its screen kept.
        exponents = {name: q.channel_exponents(amax, f4.fp4_format(name)) for name in q.ALL_FORMATS}
        w_formats = [f4.fp4_format(name) for name in q.ALL_FORMATS]
        # The layers (and a format's screens and searches) share one cache of quantized activations per format.
        caches = {name: q.ActCache() for name in q.ALL_FORMATS}  # x·2**k differs per format
        screened = {name: {f: q.screen_format(x, w, f4.fp4_format(name), exponents[name], w_formats, q.CLIP_GRID,
                                              y64=y64[f], cache=caches[name])
                           for f, w in shared.items()} for name in q.ALL_FORMATS}
        kept = q.kept_formats({n: sum(s.score for s in by_layer.values()) for n, by_layer in screened.items()})
        caches = {name: caches[name] for name in kept}
        best = None
        for name in kept:
            k = exponents[name]
            fmt = f4.fp4_format(name)
            results = {f: q.search_fp4_layer(x, w, fqn=f, a_formats=(name,), act_exponents=k, clip_grid=q.CLIP_GRID,
                                             rounds=q.SEARCH_ROUNDS, act_caches={name: caches[name]}, y64=y64[f],
                                             screened={fmt: screened[name][f]})
                       for f, w in shared.items()}
            score = sum(r.loss / energy[f] if energy[f] > 0 else r.loss for f, r in results.items())
            if best is None or score < best[0]:
                best = (score, results)
        for f, res in best[1].items():
            out[f] = (res, "search")
    return out
