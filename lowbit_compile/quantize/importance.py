"""How much each block and each linear matters, for mixed precision.

- LIM (LayerwiseQuant's layer input modification): 1 − cos(block input, block output) averaged over tokens.
  A block that changes its input more is taken as more important (it gets the wider format).
- ZD (LayerwiseQuant's z-score distribution): the share of a block's weights with |z| > 1, z the weight's
  z-score within its own matrix. The paper's direction is not obvious from the definition, so callers rank
  both ways (`ranking(..., important="high" | "low")`) and the benchmark shows which one orders layers better.
- Per linear and candidate format: the measured proxy loss tr((Ŵ−W) H (Ŵ−W)ᵀ) and the exact stored bits,
  from quantizing the layer at that candidate (`measure_candidates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..recipe import LayerSpec


def lim_score(inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]) -> float:
    """1 − cos(x, y) per token (the last dimension is the hidden size), averaged over every token given."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs, strict=True):
        if x.shape != y.shape:
            raise LowbitError(f"LIM needs a block's input and output of one shape; got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}")
        cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                                    y.reshape(-1, y.shape[-1]).double(), dim=-1)
        total, count = total + float((1 - cos).sum()), count + cos.numel()
    if not count:
        raise LowbitError("LIM needs at least one token of block input and output")
    return total / count


def lim_scores(summary) -> dict[str, float]:
    """Per block LIM from a calibration summary (`CalibrationSummary` or its `as_dict()`)."""
    lim = summary["lim"] if isinstance(summary, Mapping) else summary.lim
    if not lim:
        raise LowbitError("the calibration summary has no LIM scores: the model has no repeated blocks, or it "
                          "was not calibrated block by block")
    return dict(lim)


def zd_score(weights: Iterable[torch.Tensor]) -> float:
    """Share of weights with |z| > 1 over the given matrices, z taken within each matrix."""
    above, total = 0, 0
    for w in weights:
        w = w.detach().double()
        z = (w - w.mean()) / w.std().clamp_min(1e-300)
        above, total = above + int((z.abs() > 1).sum()), total + w.numel()
    if not total:
        raise LowbitError("ZD needs at least one weight matrix")
    return above / total


def zd_scores(model: torch.nn.Module) -> dict[str, float]:
    """Per repeated block (calibrate.find_blocks), ZD over the block's linear weights."""
    from ..calibrate import find_blocks, named_linears

    name, blocks = find_blocks(model)
    if not blocks:
        raise LowbitError(f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of same-type "
                          f"layers holding linears); ZD is scored per block")
    return {f"{name}.{i}": zd_score(lin.weight for lin in named_linears(b).values()) for i, b in enumerate(blocks)}


def ranking(scores: Mapping[str, float], important: str = "high") -> list[str]:
    """Names most important first: by decreasing score when important="high", increasing when "low"."""
    if important not in ("high", "low"):
        raise LowbitError(f"important must be 'high' or 'low', got {important!r}")
    return sorted(scores, key=lambda k: scores[k], reverse=important == "high")


@dataclass(frozen=True)
class CandidateResult:
    """One linear quantized at one candidate format."""

    bits: int  # exact stored bits: codes + float16 scales + sign bits
    proxy_loss: float  # tr((Ŵ−W) H (Ŵ−W)ᵀ) against the layer's input Hessian
    weight_error: float  # ||Ŵ − W||_F / ||W||_F


def stored_bits(rec, finetune: bool = False) -> int:
    """A record's exact stored bits (bits_per_weight() is that count over the weight count). `finetune`: as it will
    be stored once block fine-tuning (-ft, quantize/finetune.py) has made its sign vectors real: 16 bits an entry
    instead of 1, so a mixed-precision budget of -ft candidates holds for the checkpoint."""
    bits = round(rec.bits_per_weight() * rec.in_features * rec.out_features)
    if finetune:
        bits += 15 * sum(v.numel() for v in (getattr(rec, "su", None), getattr(rec, "sv", None))
                         if v is not None and bool((v.abs() == 1).all()))
    return bits


def output_energy(w: torch.Tensor, h: torch.Tensor) -> float:
    """tr(W H Wᵀ): the mean squared output of the float layer, the scale its proxy losses compare to."""
    w = w.detach().double()
    return float(((w @ h.double()) * w).sum())


def candidate_result(rec, w: torch.Tensor, hessian: torch.Tensor | None, finetune: bool = False) -> CandidateResult:
    """Bits (`stored_bits`) and proxy loss of one quantized record. Integer records carry tr(ΔW H ΔWᵀ); for others
    (FP4, whose own loss is measured differently) and records without one it is computed from the dequantized
    weight, so every candidate is compared in one measure (for W4A4 FP4: the weight error only)."""
    loss = rec.proxy_loss if getattr(rec, "kind", "int") == "int" else None
    if loss is None:
        if hessian is None:
            raise LowbitError(f"layer {rec.fqn}: its proxy loss needs calibration data (an input Hessian)")
        d = rec.dequantized_weight().double() - w.detach().double()
        loss = float(((d @ hessian.double()) * d).sum())
    return CandidateResult(stored_bits(rec, finetune), float(loss), float(rec.weight_error))


def measure_candidates(fqn: str, w: torch.Tensor, hessian: torch.Tensor | None,
                       candidates: Mapping[str, LayerSpec], seed: int = 0, sample: torch.Tensor | None = None,
                       absmax: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Quantize one linear at every candidate: ({name: CandidateResult}, {name: record}). FP4 candidates need
    a sample of the layer's inputs (and take its per-channel max |x|), as quantize_weight does."""
    from .layer import quantize_weight

    results, records, spaces = {}, {}, {}  # spaces: the rotated, factored layer, shared by QuIP's bit widths
    for name, spec in candidates.items():
        extra = {"sample": sample, "absmax": absmax} if spec.method == "fp4" else {}
        records[name] = quantize_weight(fqn, w, spec, seed, hessian=hessian, spaces=spaces, **extra)
        results[name] = candidate_result(records[name], w, hessian, spec.finetune)
    return results, records


def output_sensitivity(model: torch.nn.Module, batches: list, fqns: Iterable[str], probes: int = 2,
                       seed: int = 0) -> dict[str, float]:
    """Per linear, s = E_r ||∂(r·out)/∂y||² / out_features, with r Gaussian probes on the model's first output
    (last hidden state or logits; positions masked out by attention_mask are not probed) and y the linear's
    output over the batch. If a layer's output error is spread evenly over its outputs and tokens (the output
    rotation of QuIP spreads it over outputs), the model-output squared error it causes is s × its proxy loss
    tr(ΔW H ΔWᵀ): s converts proxy losses of different layers into one currency. A layer whose output does not
    reach the model's first output (a pooler) gets 0."""
    fqns, batches = list(fqns), list(batches)
    if not batches or probes < 1:
        raise LowbitError("output sensitivity needs at least one calibration batch and one probe")
    mods = {f: model.get_submodule(f) for f in fqns}
    gen = torch.Generator().manual_seed(seed)
    acc = dict.fromkeys(fqns, 0.0)
    outs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, f=f: outs.__setitem__(f, o)) for f, m in mods.items()]
    flags = {f: m.weight.requires_grad for f, m in mods.items()}
    try:
        for m in mods.values():
            m.weight.requires_grad_(True)  # so every linear output is on the autograd graph
        for batch in batches:
            outs.clear()
            with torch.enable_grad():
                y = _first_tensor(_forward(model, batch))
                mask = _probe_mask(batch, y)
                for _ in range(probes):
                    r = torch.randn(y.shape, generator=gen, dtype=y.dtype) * mask
                    grads = torch.autograd.grad((y * r).sum(), [outs[f] for f in fqns], retain_graph=True,
                                                allow_unused=True)
                    for f, g in zip(fqns, grads):
                        if g is not None:
                            acc[f] += float(g.double().square().sum()) / g.shape[-1]
        n = probes * len(batches)
        return {f: v / n for f, v in acc.items()}
    finally:
        for h in hooks:
            h.remove()
        for f, m in mods.items():
            m.weight.requires_grad_(flags[f])


def _forward(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch) if isinstance(batch, torch.Tensor) else model(*batch)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for t in out:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise LowbitError("output sensitivity needs a model whose first output is a float tensor")


def _probe_mask(batch, y: torch.Tensor) -> torch.Tensor:
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if m is not None and y.dim() == 3 and tuple(m.shape) == tuple(y.shape[:2]):
        return m.to(y.dtype).unsqueeze(-1)
    return torch.ones((), dtype=y.dtype)
