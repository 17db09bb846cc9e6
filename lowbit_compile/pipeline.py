"""lb.quantize: calibrate (when the recipe needs it), quantize every linear, return a Checkpoint."""

from __future__ import annotations

import logging

import torch

from .calibrate import calibrate_blocks, named_linears
from .checkpoint import Checkpoint
from .errors import LowbitError
from .memory import TRIM_SLACK, release_freed_memory
from .quantize.layer import check_group_size, check_weight, quantize_fp4_group, quantize_weight
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
             seed: int = 0, sequential: bool = True, progress: bool = True, work_dir=None) -> Checkpoint:
    """Quantize every linear of `model` by the recipe; the model itself is not modified.

    calibration: a list of batches (dicts of tensors, or input_ids tensors), a list of strings or a text
    file path (with tokenizer=), or "stdlib" (standard-library docstrings, with tokenizer=). Needed by the
    LDLQ recipes (w*-quip, w*-optq), FP4 (fp4, w4a16-fp4) and mixed precision ("2.5bpw": overrides pin layers,
    the plan is in checkpoint.meta["mixed"]); data-free recipes ignore it.

    FP4 layers fed the very same tensor (q/k/v, gate/up) are quantized as a group sharing one vector of
    per-channel activation exponents (quantize.layer.quantize_fp4_group). With sequential calibration the
    next block sees FP4 W4A4 layers as they run (activation rounding included), other layers through their
    dequantized weights.

    work_dir: a folder that keeps each finished unit (one repeated block, then the linears outside the
    blocks) as soon as it is done. Run again with the same model, data, recipe, seed and work_dir after an
    interruption (an error, Ctrl-C, a killed process), the finished units are skipped and the checkpoint is
    byte-identical to that of an uninterrupted run. A work_dir holding another run's units is refused.

    The same model, data, recipe and seed give a byte-identical checkpoint; its JSON records the recipe
    (meta["recipe_spec"]), the seed of every rotated layer, a fingerprint of the calibration data
    (meta["calibration_sha256"]) and the versions of the tools.
    """
    from .calibrate import units_of
    from .io import fingerprint

    rec = Recipe.parse(recipe, overrides, seed)
    if rec.target_bpw is not None:  # "2.5bpw": measure every candidate, solve, then quantize with the plan
        if work_dir is not None:
            raise LowbitError(f"work_dir (resuming) is not supported for the mixed-precision recipe {rec.name!r} "
                              f"yet; leave it out")
        from .mixed import quantize_mixed

        return quantize_mixed(model, calibration, rec.target_bpw, rec.candidates, rec.unit,
                              pins=dict(rec.overrides) or None, tokenizer=tokenizer, seed=rec.seed,
                              progress=progress)
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
            try:
                r = quantize_weight(fqn, lin.weight, spec, rec.seed, hessian=None if st is None else st.hessian)
            except LowbitError as e:
                raise e if f"layer {fqn}" in str(e) else LowbitError(f"layer {fqn}: {e}") from None
            records[fqn] = r
            deq[fqn] = _replacement(r, lin)
            release_freed_memory(TRIM_SLACK)  # glibc keeps the freed temporaries of each layer otherwise
        for group in fp4_groups.values():
            st = stats[next(iter(group))]  # one LayerStats object, shared by the whole group
            for fqn, r in quantize_fp4_group(group, st.sample, st.absmax, rec.seed).items():
                records[fqn] = r
                if r.notes:
                    next(p for p in plan if p["fqn"] == fqn)["notes"] = list(r.notes)
                    for note in r.notes:
                        log.warning("lowbit: %s", note)
                deq[fqn] = _replacement(r, linears[fqn])
            release_freed_memory(TRIM_SLACK)
        return deq

    for fqn, lin in named_linears(model).items():  # fail before hours of calibration, not after
        spec = rec.spec_for(fqn)[0]
        if spec is not None:
            check_weight(fqn, lin.weight)
            check_group_size(fqn, lin.in_features, spec)
    batches = _resolve_calibration(calibration, tokenizer) if rec.needs_calibration else None
    units = units_of(model)
    store = None
    if work_dir is not None:
        store = WorkDir(work_dir, _run_identity(model, rec, batches, sequential))
    unit_of = {fqn: unit for unit, linears in units.items() for fqn in linears}

    def quantize_unit(linears, stats):
        n_plan, before = len(plan), set(records)
        deq = quantize_layers(linears, stats)
        if store is not None and linears:
            store.save(unit_of[next(iter(linears))], {f: r for f, r in records.items() if f not in before},
                       plan[n_plan:])
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

    summary, meta = {}, {"recipe_spec": _recipe_spec(rec)}
    if rec.needs_calibration:
        summary = calibrate_blocks(model, batches, quantize_unit, sequential, progress,
                                   resume=resume if store is not None else None).as_dict()
        meta["calibration_sha256"] = fingerprint(batches)
    else:
        for unit, linears in units.items():
            if resume(unit, linears) is None:
                quantize_unit(linears, {})
    if not plan:
        log.warning("lowbit: the model has no nn.Linear layers; nothing was quantized")
    order = {n: i for i, n in enumerate(named_linears(model))}
    plan.sort(key=lambda p: order.get(p["fqn"], len(order)))
    records = {f: records[f] for f in sorted(records, key=lambda f: order.get(f, len(order)))}
    release_freed_memory()
    return Checkpoint(records=records, recipe=rec.name, seed=rec.seed, plan=plan, calibration=summary, meta=meta)


def _replacement(r, lin: torch.nn.Linear):
    """What the rest of the model sees for a quantized linear while calibrating sequentially: the dequantized
    weight, or for FP4 W4A4 (activations rounded too) the run-time module."""
    from .checkpoint import FP4QuantizedLinear
    from .nn import LowbitFP4Linear

    if isinstance(r, FP4QuantizedLinear) and r.a_format is not None:
        return LowbitFP4Linear(r, lin.bias)
    return r.dequantized_weight()


def _recipe_spec(rec: Recipe) -> dict:
    """The recipe in full (default spec, overrides, seed), JSON-ready."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(rec)))


def _run_identity(model: torch.nn.Module, rec: Recipe, batches, sequential: bool) -> dict:
    """What decides a run's results: a resumed run must match the run that wrote the work_dir in all of it."""
    from .checkpoint import FORMAT_VERSION, _versions
    from .io import fingerprint, model_fingerprint

    versions = _versions()
    return {"recipe": _recipe_spec(rec), "sequential": bool(sequential) if batches is not None else None,
            "calibration_sha256": None if batches is None else fingerprint(batches),
            "model_sha256": model_fingerprint(model), "format_version": FORMAT_VERSION,
            "versions": {k: versions.get(k) for k in ("torch", "lowbit-compile")}}


class WorkDir:
    """The finished units of one lb.quantize run: `run.json` (what the run depends on) and `units/<unit>/`
    (a small checkpoint per unit: its records and plan entries), each written atomically when the unit
    finishes. A unit whose files are missing or damaged is simply quantized again."""

    RUN_FILE = "run.json"

    def __init__(self, path, identity: dict):
        import json
        import os

        from .io import atomic_write_bytes

        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        run_path = os.path.join(self.path, self.RUN_FILE)
        if os.path.exists(run_path):
            try:
                with open(run_path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            if old != identity:
                differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise LowbitError(f"work_dir {self.path} holds the finished blocks of a different run (it differs in: "
                                  f"{', '.join(differ)}); use another or an empty work_dir, or delete {self.path} "
                                  f"to start over")
        else:
            atomic_write_bytes(run_path, json.dumps(identity, indent=1, sort_keys=True).encode())

    def _unit_dir(self, unit: str) -> str:
        import os

        return os.path.join(self.path, "units", unit)

    def load(self, unit: str):
        """(records, plan entries) of a finished unit, or None."""
        import os

        from .checkpoint import META_FILE

        d = self._unit_dir(unit)
        if not os.path.exists(os.path.join(d, META_FILE)):
            return None
        try:
            ck = Checkpoint.load(d)
        except LowbitError as e:
            log.warning("lowbit: the stored unit %s in %s is damaged (%s); quantizing it again", unit, self.path, e)
            return None
        return ck.records, ck.plan

    def save(self, unit: str, records: dict, plan: list) -> None:
        Checkpoint(records=records, plan=list(plan)).save(self._unit_dir(unit))
