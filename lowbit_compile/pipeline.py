"""lb.quantize: calibrate (when the recipe needs it), quantize every linear, return a Checkpoint."""

from __future__ import annotations

import logging

import torch

from .calibrate import calibrate_blocks, named_linears
from .checkpoint import Checkpoint
from .errors import LowbitError
from .quantize.layer import quantize_fp4_group, quantize_weight
from .recipe import Recipe

log = logging.getLogger("lowbit_compile")


def default_calibration(tokenizer, n_sentences: int = 128, batch_size: int = 16, max_length: int = 128):
    """Batches of English sentences from the standard library's docstrings (no download)."""
    from .data import stdlib_sentences

    if tokenizer is None:
        raise LowbitError("calibration='stdlib' needs the model's tokenizer: pass tokenizer=...")
    return tokenize(tokenizer, stdlib_sentences("calibration", limit=n_sentences), batch_size, max_length)


def tokenize(tokenizer, texts, batch_size: int = 16, max_length: int = 128) -> list[dict]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LowbitError("the calibration text is empty: give at least one non-empty line")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def _resolve_calibration(calibration, tokenizer):
    if isinstance(calibration, str):
        if calibration == "stdlib":
            return default_calibration(tokenizer)
        with open(calibration) as f:  # a text file, one sample per line
            return tokenize(tokenizer, f.read().splitlines()) if tokenizer else _no_tokenizer(calibration)
    if calibration is not None:
        items = list(calibration)
        if items and all(isinstance(t, str) for t in items):
            return tokenize(tokenizer, items) if tokenizer else _no_tokenizer("a list of strings")
        return items
    return None


def _no_tokenizer(what):
    raise LowbitError(f"calibration from {what} needs the model's tokenizer: pass tokenizer=...")


def quantize(model: torch.nn.Module, recipe="w4", calibration=None, *, tokenizer=None, overrides=None,
             seed: int = 0, sequential: bool = True, progress: bool = True) -> Checkpoint:
    """Quantize every linear of `model` by the recipe; the model itself is not modified.

    calibration: a list of batches (dicts of tensors, or input_ids tensors), a list of strings or a text
    file path (with tokenizer=), or "stdlib" (standard-library docstrings, with tokenizer=). Needed by the
    LDLQ recipes (w*-quip, w*-optq) and FP4 (fp4, w4a16-fp4); data-free recipes ignore it.

    FP4 layers fed the very same tensor (q/k/v, gate/up) are quantized as a group sharing one vector of
    per-channel activation exponents (quantize.layer.quantize_fp4_group). With sequential calibration the
    next block sees FP4 W4A4 layers as they run (activation rounding included), other layers through their
    dequantized weights.
    """
    from .nn import LowbitFP4Linear

    rec = Recipe.parse(recipe, overrides, seed)
    records, plan = {}, []

    def quantize_layers(linears, stats):
        deq = {}
        fp4_groups: dict[str, dict] = {}  # stats owner -> {fqn: (weight, spec)}
        for fqn, lin in linears.items():
            spec, why = rec.spec_for(fqn)
            shape = [lin.out_features, lin.in_features]
            if spec is None:
                plan.append({"fqn": fqn, "shape": shape, "spec": "float", "reason": why})
                continue
            st = stats.get(fqn)
            if spec.needs_calibration and st is None:
                plan.append({"fqn": fqn, "shape": shape, "spec": "float",
                             "reason": "no calibration data reached this layer"})
                log.warning("lowbit: layer %s received no calibration data; kept in float", fqn)
                continue
            plan.append({"fqn": fqn, "shape": shape, "spec": spec.describe(), "reason": why,
                         "calibration_tokens": None if st is None else st.tokens})
            if spec.method == "fp4":
                fp4_groups.setdefault(st.owner or fqn, {})[fqn] = (lin.weight, spec)
                continue
            r = quantize_weight(fqn, lin.weight, spec, rec.seed, hessian=None if st is None else st.hessian)
            records[fqn] = r
            deq[fqn] = r.dequantized_weight()
        for group in fp4_groups.values():
            st = stats[next(iter(group))]  # one LayerStats object, shared by the whole group
            for fqn, r in quantize_fp4_group(group, st.sample, st.absmax, rec.seed).items():
                records[fqn] = r
                if r.notes:
                    next(p for p in plan if p["fqn"] == fqn)["notes"] = list(r.notes)
                    for note in r.notes:
                        log.warning("lowbit: %s", note)
                bias = linears[fqn].bias
                deq[fqn] = r.dequantized_weight() if r.a_format is None else LowbitFP4Linear(r, bias)
        return deq

    summary = {}
    if rec.needs_calibration:
        batches = _resolve_calibration(calibration, tokenizer)
        summary = calibrate_blocks(model, batches, quantize_layers, sequential, progress).as_dict()
    else:
        quantize_layers(named_linears(model), {})
    if not plan:
        log.warning("lowbit: the model has no nn.Linear layers; nothing was quantized")
    order = {n: i for i, n in enumerate(named_linears(model))}
    plan.sort(key=lambda p: order.get(p["fqn"], len(order)))
    return Checkpoint(records=records, recipe=rec.name, seed=rec.seed, plan=plan, calibration=summary)
