"""Explain a W4A4 FP4 export mismatch by activations that round the other way at an FP4 rounding midpoint.

A W4A4 layer rounds its input to the FP4 grid. The exported program computes that input (norms, attention, the
rotation) in another float order than PyTorch, so an activation within float rounding (~1e-7 relative) of a
midpoint between two grid values may round to the other neighbour. That is one grid step on one activation (up
to a third of its value), and it moves the outputs by 3–70 % of their maximum (measured: the activation nearest
to a midpoint flipped, layer by layer, in 1–2-layer Llama and the 6-layer MiniLM, fp4 and fp4-rot): no output
tolerance can accept that and still catch bugs. Flips are rare but real: none in the tests' small exports, one in
each of the benchmark's fp4 exports (bench/export_size.py; in MiniLM an attention-output activation at
q = 0.50000024, 2e-8 of the FP4 range above the midpoint 0.5, rounded to 1 by PyTorch and to 0 by the program: 6 %
of the output maximum). So the exporter checks W4A4 programs at the float tolerance, and only when that fails
asks: is the program the PyTorch quantized model with a few near-midpoint activations rounded the other way?

`explain_by_flips` answers by a greedy search on the reference model: each step tries the nearest-to-midpoint
activations of the current hypothesis (at most CANDIDATES, all within FLIP_MARGIN of a midpoint), keeps the flip
that brings the reference closest to the program, and stops when they match at the float tolerance (the flips
are the explanation), when no flip helps, or after MAX_FLIPS (no explanation). A decoding or rounding bug changes
most activations and cannot be explained by a few flips of activations that sit on a midpoint.

A flip is applied to the reference as a change of that layer's output, y[token] += Δ·Ŵ'[:, channel] with Δ the
change of the rounded activation, recomputed in every run from the activation as it is in that run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import fp4 as f4
from ..kernels.fp4_ops import dequantize_fp4_weight
from ..nn import LowbitFP4Linear

FLIP_MARGIN = 1e-5  # |q − m| / g₇: float rounding of the program's inputs moves q by ~1e-7 of g₇; 100× headroom
MAX_FLIPS = 4
CANDIDATES = 8


@dataclass(frozen=True)
class Flip:
    """Activation `index` (flat, tokens × in_features) of call `call` of W4A4 layer `layer`, rounded the other way."""

    layer: str
    call: int
    index: int
    in_features: int
    distance: float = 0.0  # |q − m| / g₇ when it was found (`_nearest_midpoint`)

    def describe(self) -> str:
        token, channel = divmod(self.index, self.in_features)
        return (f"layer {self.layer}: input channel {channel} of token {token} ({self.distance:.1e} of the FP4 "
                f"range from a rounding midpoint)")


def _quotients(mod: LowbitFP4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', q): the shifted (and rotated) float32 input the op rounds, flattened, and q = |x'| / s, by the
    functions the op itself uses."""
    if mod.su is not None:
        x = torch.ops.lowbit.hadamard(x, mod.su, mod.had_in)
    x = x.to(torch.float32).reshape(-1, mod.in_features)
    if mod.act_shift is not None:
        x = x * f4.exponent_multipliers(mod.act_shift)
    x = x.reshape(-1)
    return x, x.abs() / mod.act_scale.to(torch.float32).reshape(())


def _nearest_midpoint(q: torch.Tensor, fmt: f4.FP4Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, |q − mᵢ| / g₇) for the nearest midpoint mᵢ = (gᵢ + gᵢ₊₁)/2 of the bias-0 magnitudes g₀ < … < g₇.

    The distance is in units of the format's range: the scale puts a tensor's largest values near g₇, and the
    float error of an activation computed in another order scales with the tensor's values, not with its own."""
    g = fmt.magnitudes()
    d, i = (q.unsqueeze(-1) - (g[:-1] + g[1:]) / 2).abs().min(-1)
    return i, d / g[-1]


class _Hypothesis:
    """Forward hooks on every W4A4 layer: apply `flips`, and record the near-midpoint activations of this run."""

    def __init__(self, model: torch.nn.Module, flips: list[Flip]):
        self.flips = flips
        self.valid = True
        self.candidates: list[Flip] = []
        self.calls: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, LowbitFP4Linear) and m.a_format is not None]

    def _hook(self, mod, args, y):
        call = self.calls.get(mod.fqn, 0)
        self.calls[mod.fqn] = call + 1
        x, q = _quotients(mod, args[0])
        fmt = f4.fp4_format(mod.a_format)
        mid, dist = _nearest_midpoint(q, fmt)
        mine = {f.index for f in self.flips if (f.layer, f.call) == (mod.fqn, call)}
        for i in torch.nonzero(dist <= FLIP_MARGIN).flatten().tolist():
            if i not in mine:
                self.candidates.append(Flip(mod.fqn, call, i, mod.in_features, float(dist[i])))
        if not mine:
            return None
        g, s = fmt.magnitudes(), mod.act_scale.to(torch.float32).reshape(())
        w = dequantize_fp4_weight(mod.qweight, mod.w_scales, mod.w_format, mod.in_features)
        y = y.clone()
        rows = y.view(-1, y.shape[-1])
        for i in mine:
            if float(dist[i]) > FLIP_MARGIN:  # an upstream flip moved it off the midpoint: not a flip any more
                self.valid = False
                continue
            lo, hi = float(g[mid[i]]), float(g[mid[i] + 1])
            now = float(f4.quantize(x[i:i + 1], fmt, s).abs()) / float(s)
            other = lo if now == hi else hi
            delta = (other - now) * float(s) * (-1.0 if float(x[i]) < 0 else 1.0)  # change of the signed value
            token, channel = divmod(i, mod.in_features)
            rows[token] += (delta * w[:, channel]).to(y.dtype)
        return y

    def remove(self):
        for h in self.handles:
            h.remove()


def explain_by_flips(model: torch.nn.Module, run: Callable[[], list[torch.Tensor]], ys: list[torch.Tensor],
                     error: Callable[[list[torch.Tensor], list[torch.Tensor]], float],
                     tolerance: float) -> list[Flip] | None:
    """Flips of near-midpoint W4A4 activations that make `run()` (the reference model's outputs) match the
    program's outputs `ys`, i.e. error(ys, outputs) <= tolerance; None when no few flips do."""

    def attempt(flips):
        hyp = _Hypothesis(model, flips)
        try:
            with torch.no_grad():
                out = run()
        finally:
            hyp.remove()
        return (error(ys, out) if hyp.valid else float("inf")), sorted(hyp.candidates, key=lambda f: f.distance)

    flips: list[Flip] = []
    err, candidates = attempt(flips)
    while err > tolerance and len(flips) < MAX_FLIPS and candidates:
        tried = [(attempt(flips + [c]), c) for c in candidates[:CANDIDATES]]
        (best_err, best_candidates), best = min(tried, key=lambda t: t[0][0])
        if best_err >= err:
            return None
        flips, err, candidates = flips + [best], best_err, best_candidates
    return flips if err <= tolerance else None
