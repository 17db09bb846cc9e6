"""lb.quantize: calibrate (when the recipe needs it) block by block, quantize each block's linears with the core
(quantize/core.py), return a Checkpoint. A mixed-precision recipe ("2.5bpw") is planned first (mixed.py) and then
quantized with the plan."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from . import distributed
from .calibrate import (  # noqa: F401  (default_calibration, tokenize: the names scripts import from here)
    calibrate_blocks,
    default_calibration,
    named_linears,
    resolve_calibration,
    tokenize,
    units_of,
)
from .checkpoint import Checkpoint
from .errors import LowbitError
from .memory import release_freed_memory
from .quantize.core import NO_DATA, Embedding, Layer, precheck, quantize_embeddings
from .quantize.finetune import BlockTuner
from .recipe import Recipe
from .workdir import WorkDir, recipe_spec, run_identity

log = logging.getLogger("lowbit_compile")


def quantize(model: torch.nn.Module | str | os.PathLike, recipe="w4", calibration=None, *, tokenizer=None,
             overrides=None, seed: int = 0, sequential: bool = True, progress: bool = True, work_dir=None,
             report_path: str | None = None) -> Checkpoint:
    """Quantize every linear of `model` by the recipe; the model itself is not modified.

    model: a module, or the path of a transformers save_pretrained folder (safetensors), which is read one
    repeated block at a time (stream.py: for models larger than memory; the same checkpoint, byte for byte, as
    for the model loaded in memory; the folder's tokenizer serves text calibration when tokenizer= is not given).

    calibration: a list of batches (dicts of tensors, or input_ids tensors), a list of strings or a text
    file path (with tokenizer=), or "stdlib" (standard-library docstrings, with tokenizer=). Needed by the
    LDLQ recipes (w*-quip, w*-optq), FP4 (fp4, w4a16-fp4) and mixed precision ("2.5bpw": overrides pin layers,
    the plan is in checkpoint.meta["mixed"]; report_path writes its table there and its plot beside it);
    data-free recipes ignore it.

    FP4 layers fed the very same tensor (q/k/v, gate/up) are quantized as a group sharing one vector of
    per-channel activation exponents (quantize.layer.quantize_fp4_group). With sequential calibration the
    next block sees FP4 W4A4 layers as they run (activation rounding included), other layers through their
    dequantized weights.

    work_dir: a folder that keeps each finished unit (one repeated block, then the linears outside the
    blocks) as soon as it is done. Run again with the same model, data, recipe, seed and work_dir after an
    interruption (an error, Ctrl-C, a killed process), the finished units are skipped and the checkpoint is
    byte-identical to that of an uninterrupted run. A work_dir holding another run's units is refused.

    Under torchrun (after distributed.init()) the linears of each block are split over the processes and the result
    is the same on every rank, byte for byte that of one process; rank 0 alone shows progress and writes the work_dir
    (distributed.py).

    The same model, data, recipe and seed give a byte-identical checkpoint; its JSON records the recipe
    (meta["recipe_spec"]), the seed of every rotated layer, a fingerprint of the calibration data
    (meta["calibration_sha256"]) and the versions of the tools.
    """
    rec = Recipe.parse(recipe, overrides, seed)
    progress = progress and distributed.rank() == 0
    if isinstance(model, (str, os.PathLike)):
        return _quantize_folder(model, rec, calibration, tokenizer, sequential, progress, work_dir)
    if rec.target_bpw is not None:  # "2.5bpw": measure every candidate, solve, then quantize with the plan
        if work_dir is not None:
            raise LowbitError(f"work_dir (resuming) is not supported for the mixed-precision recipe {rec.name!r} "
                              f"yet; leave it out")
        return quantize_mixed(model, calibration, rec.target_bpw, rec.candidates, rec.unit,
                              pins=dict(rec.overrides) or None, tokenizer=tokenizer, seed=rec.seed,
                              progress=progress, report_path=report_path)
    return _quantize(model, rec, calibration, tokenizer, sequential, progress, work_dir)


def _quantize_folder(folder, rec: Recipe, calibration, tokenizer, sequential: bool, progress: bool, work_dir):
    """lb.quantize of a save_pretrained folder, streamed block by block (stream.py)."""
    from .stream import open_folder

    if rec.target_bpw is not None:
        raise LowbitError(f"the mixed-precision recipe {rec.name!r} measures every block in memory; it cannot stream "
                          f"from {os.fspath(folder)} yet: load the model and pass it, or give a fixed recipe")
    source = open_folder(folder)
    texts = isinstance(calibration, str) or (isinstance(calibration, (list, tuple)) and calibration
                                             and all(isinstance(t, str) for t in calibration))
    if tokenizer is None and texts and rec.needs_calibration:
        tokenizer = source.tokenizer()
    return _quantize(source.model, rec, calibration, tokenizer, sequential, progress, work_dir, source=source)


def _quantize(model, rec: Recipe, calibration, tokenizer, sequential: bool, progress: bool, work_dir,
              embeddings_by: Recipe | None = None, source=None):
    """lb.quantize for a recipe that is not a budget; `embeddings_by` decides the embeddings (default: `rec`);
    `source`, a stream.StreamedModel whose blocks `model` holds on the meta device until loaded."""
    from .io import fingerprint

    # before hours of calibration (a streamed model's weights are checked as each block is quantized)
    precheck([Layer(f, lin.weight) for f, lin in named_linears(model).items()], rec, weights=source is None)
    batches = resolve_calibration(calibration, tokenizer) if rec.needs_calibration else None
    store = None if work_dir is None else WorkDir(work_dir, run_identity(
        model, rec, batches, sequential, model_sha256=None if source is None else source.fingerprint()))
    loaded = contextlib.nullcontext if source is None else source.loaded
    units = units_of(model)
    unit_of = {fqn: unit for unit, linears in units.items() for fqn in linears}
    embedded = Embedded(model, embeddings_by or rec)  # data-free: before calibration, which then sees them
    records, plan = {}, []
    tuner = BlockTuner.for_recipe(model, rec, progress)  # None unless a layer spec asks for fine-tuning

    def quantize_unit(linears, stats):
        unit_records = {}
        unit = unit_of.get(next(iter(linears), ""), "")

        def quantize_some(linears, stats):
            layers = [Layer(fqn, lin.weight, stats.get(fqn), getattr(stats.get(fqn), "owner", "") or fqn)
                      for fqn, lin in linears.items()]
            # core's, or split over ranks; then what the next blocks see when calibrating sequentially (each weight
            # rebuilt once, by the rank that quantized it, before the records are exchanged)
            ready = {}

            def prepare(fqn, r):
                if _replaced_by_weight(r):
                    ready[fqn] = _replacement(r, linears[fqn])

            rows = distributed.quantize_linears(layers, rec, on_record=unit_records.__setitem__, unit=unit,
                                                prepare=prepare)
            return rows, distributed.replacements(layers, unit_records, lambda f, r: _replacement(r, linears[f]),
                                                  is_tensor=_replaced_by_weight, unit=unit, ready=ready)

        # -ft: the block's linears group by group, tuned to the block's float outputs between the groups; bias
        # correction (recipe.LayerSpec.bias_correct): group by group too, each group's biases set after it
        tuned = tuner.quantize_block(linears, stats, quantize_some) if tuner is not None else None
        extra = {}
        if tuned is None:
            rows, deq = quantize_some(linears, stats)
        else:
            rows, deq, stats, extra = tuned
        unit_plan = [_plan_entry(row, stats.get(row.fqn)) for row in rows]
        for entry in unit_plan:
            entry.update(extra.get(entry["fqn"], {}))
        records.update(unit_records)
        plan.extend(unit_plan)
        if store is not None and linears and distributed.rank() == 0:
            store.save(unit, unit_records, unit_plan)
        return deq

    def resume(unit, linears):
        done = store.load(unit) if store is not None else None
        if done is None:
            return None
        unit_records, unit_plan = done
        records.update(unit_records)
        plan.extend(unit_plan)
        log.info("lowbit: %s was finished by an earlier run (%s); skipped", unit, store.path)
        return {f: _replacement(r, linears[f]) for f, r in unit_records.items()}

    summary, meta = {}, {"recipe_spec": recipe_spec(rec)}
    if rec.needs_calibration:
        with _dequantized_embeddings(model, embedded.records if sequential else {}), tuner or contextlib.nullcontext():
            summary = calibrate_blocks(model, batches, quantize_unit, sequential, progress,
                                       resume=resume if store is not None else None,
                                       loader=None if source is None else source.loaded,
                                       shard=distributed.shard(rec, finetune=tuner is not None),
                                       needs_hessian=rec.needs_hessian).as_dict()
        meta["calibration_sha256"] = fingerprint(batches)
    else:
        for unit, linears in units.items():
            if resume(unit, linears) is None:
                with loaded(unit):
                    quantize_unit(linears, {})
    embedded.merge(records, plan)
    if not plan:
        log.warning("lowbit: the model has no nn.Linear layers; nothing was quantized")
    order = {n: i for i, n in enumerate(named_linears(model))}
    plan.sort(key=lambda p: order.get(p["fqn"], len(order)))
    records = {f: records[f] for f in sorted(records, key=lambda f: order.get(f, len(order)))}
    release_freed_memory()
    return Checkpoint(records=records, recipe=rec.name, seed=rec.seed, plan=plan, calibration=summary, meta=meta)


def _plan_entry(row, stats) -> dict:
    """The checkpoint's plan entry of one core row (JSON-ready)."""
    entry = {"fqn": row.fqn, "shape": list(row.shape), "spec": "float", "reason": row.reason}
    if row.quantized:
        entry.update(spec=row.spec.describe(), calibration_tokens=None if stats is None else stats.tokens)
        if row.notes:
            entry["notes"] = list(row.notes)
    return entry


# ----------------------------------------------------------------------------- embeddings


class Embedded:
    """The quantized embeddings of a model (quantize/core.quantize_embeddings) and their plan entries; `merge` puts
    them into lb.quantize's records and plan, a tied head's entry replacing its float one."""

    def __init__(self, model: torch.nn.Module, rec: Recipe):
        linears = named_linears(model)
        items = [Embedding(f, m.weight, {h: (lin.out_features, lin.in_features) for h, lin in linears.items()
                                         if lin.weight is m.weight})
                 for f, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
        self.records, self.plan = quantize_embeddings(items, rec)

    def merge(self, records: dict, plan: list) -> None:
        records.update(self.records)
        plan[:] = [self.plan.get(p["fqn"], p) for p in plan]
        plan += [e for f, e in self.plan.items() if all(p["fqn"] != f for p in plan)]


@contextlib.contextmanager
def _dequantized_embeddings(model: torch.nn.Module, records: dict):
    """While calibrating sequentially, the model's quantized embeddings return their dequantized rows (a tied head
    then computes with them too, as it will run); the user's weights are restored afterwards."""
    saved = []
    try:
        for fqn, r in records.items():
            mod = model.get_submodule(fqn)
            if isinstance(mod, torch.nn.Embedding):
                saved.append((mod.weight, mod.weight.data))
                mod.weight.data = r.dequantized_weight().to(mod.weight.dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _replaced_by_weight(r) -> bool:
    """True when `_replacement` gives a dequantized weight (float32, the layer's shape), not a module."""
    from .quantize.records import FP4QuantizedLinear

    return not (isinstance(r, FP4QuantizedLinear) and r.a_format is not None) and getattr(r, "bias", None) is None


def _replacement(r, lin: torch.nn.Linear):
    """What the rest of the model sees for a quantized linear while calibrating sequentially: the dequantized
    weight; for FP4 W4A4 (activations rounded too) the run-time module (nn.CalibrationFP4Linear); for a record with
    its own bias (bias correction) the dequantized weight with that bias (nn.DequantizedLinear)."""
    from .nn import CalibrationFP4Linear, DequantizedLinear
    from .quantize.records import FP4QuantizedLinear

    if isinstance(r, FP4QuantizedLinear) and r.a_format is not None:
        return CalibrationFP4Linear(r, lin.bias)
    if getattr(r, "bias", None) is not None:
        return DequantizedLinear(r.dequantized_weight(), r.bias)
    return r.dequantized_weight()


def quantize_mixed(model: torch.nn.Module, calibration, target_bpw: float, candidates=None, unit: str = "linear",
                   pins=None, *, tokenizer=None, seed: int = 0, loss: str = "output", measurements=None,
                   report_path: str | None = None, progress: bool = True) -> Checkpoint:
    """Plan (mixed.py: measure every candidate, unless `measurements` are given, then solve), then quantize with the
    plan, calibrating sequentially. The plan goes to checkpoint.meta["mixed"]; with report_path the table is
    written there and the plot beside it (same name, .png)."""
    from . import mixed

    batches = resolve_calibration(calibration, tokenizer)
    if measurements is None:
        measurements = mixed.measure(model, batches, candidates or mixed.DEFAULT_CANDIDATES, pins, seed=seed,
                                     sensitivity_batches=4 if loss == "output" else 0, progress=progress)
    plan, report = mixed.plan_from(measurements, target_bpw, unit, loss)
    pins = Recipe.parse("w4", {k: v for k, v in (pins or {}).items() if k != "_default"}, seed)  # embeddings
    ckpt = _quantize(model, mixed.plan_recipe(plan, target_bpw, seed), batches, None, True, progress, None,
                     embeddings_by=pins)
    ckpt.meta["mixed"] = report.as_dict()
    if progress:
        print(report.table())
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path, "w") as f:
            f.write(report.table() + "\n")
        report.plot(os.path.splitext(report_path)[0] + ".png")
    return ckpt


__all__ = ["quantize", "quantize_mixed", "NO_DATA"]
