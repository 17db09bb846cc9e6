"""Layer-wise mixed precision: measure every linear at every candidate format, solve for a target average bits
per weight, then quantize with the per-layer plan.

Phase 1 (`measure`) calibrates non-sequentially: each block's linears are quantized at every candidate on
float-model Hessians to measure their proxy loss and exact stored bits; nothing is swapped into the model. LIM
and ZD are collected on the way, and each linear's output sensitivity (importance.output_sensitivity) from a
few backward passes. Phase 2 (`plan_from`) groups linears into units (a linear, the linears sharing one input
such as q/k/v, or a whole block), applies pins and runs the budget solver (quantize/allocate.py).
`pipeline.quantize_mixed` (lb.quantize with a budget recipe) then quantizes with the plan, sequentially, and stores
the plan in `checkpoint.meta["mixed"]`.

The budget covers every linear the plan decides: output heads kept in float by default (`lm_head`) are
outside it unless a pin names them; a linear pinned to float counts at its dtype's width (32 bits for float32).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .calibrate import calibrate_blocks, find_blocks, named_linears, resolve_calibration
from .errors import LowbitError
from .quantize.allocate import Option, Unit, solve
from .quantize.importance import lim_scores, measure_candidates, output_energy, output_sensitivity, zd_scores
from .recipe import DEFAULT_CANDIDATES, DEFAULT_FLOAT_PATTERNS, LayerSpec, Recipe, parse_spec

UNITS = ("linear", "group", "block")
LOSSES = {
    "output": "proxy loss × output sensitivity: the model-output squared error the layer's error causes",
    "proxy": "tr((Ŵ−W) H (Ŵ−W)ᵀ): the layer's own output squared error",
    "relative": "proxy loss / tr(W H Wᵀ): the layer's relative output error",
}
PIN = "pinned"  # the result key of a linear pinned to a format


@dataclass
class LinearInfo:
    fqn: str
    block: str  # the repeated block holding it, "" outside blocks
    group: str  # the first linear sharing its input (q/k/v share one, gate/up another)
    shape: tuple[int, int]  # (out_features, in_features)
    float_bits: int  # bits of the float weight as stored (its dtype)
    pinned: bool = False
    pin: LayerSpec | None = None  # the pinned format; None: pinned to float
    energy: float = 0.0  # tr(W H Wᵀ)
    sensitivity: float | None = None  # importance.output_sensitivity
    results: dict = field(default_factory=dict)  # candidate name (or PIN) -> CandidateResult

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Measurements:
    """Phase 1: per linear, every candidate's stored bits and proxy loss; per block, LIM and ZD."""

    candidates: dict  # name -> LayerSpec
    linears: dict  # fqn -> LinearInfo, in model order
    excluded: dict  # fqn -> why it stays in float outside the plan
    lim: dict
    zd: dict
    calibration: dict
    records: dict | None = None  # (fqn, candidate) -> QuantizedLinear, with keep_records=True


def resolve_pin(pins: Mapping[str, object] | None, fqn: str) -> tuple[bool, LayerSpec | None]:
    """(pinned, spec; None is float). Exact names first, then `re:` patterns in order, as in Recipe overrides;
    values are LayerSpecs, recipe strings ("w4-quip") or None."""
    if not pins:
        return False, None
    if fqn in pins:
        return True, _as_spec(pins[fqn], fqn)
    for key, value in pins.items():
        if key.startswith("re:") and re.fullmatch(key[3:], fqn):
            return True, _as_spec(value, key)
    return False, None


def _as_spec(value, key: str) -> LayerSpec | None:
    if value is None or isinstance(value, LayerSpec):
        return value
    try:
        return parse_spec(value)
    except LowbitError as e:
        raise LowbitError(f"pin {key!r}: {e}") from None


def candidate_specs(candidates) -> dict[str, LayerSpec]:
    """{name: LayerSpec} from recipe strings or LayerSpecs."""
    if not candidates:
        raise LowbitError(f"mixed precision needs at least one candidate format, e.g. {DEFAULT_CANDIDATES}")
    out = {}
    for c in candidates:
        spec = c if isinstance(c, LayerSpec) else parse_spec(c)
        out[c if isinstance(c, str) else spec.describe()] = spec
    return out


def measure(model: torch.nn.Module, calibration, candidates=DEFAULT_CANDIDATES, pins=None, *, tokenizer=None,
            seed: int = 0, sensitivity_batches: int = 4, keep_records: bool = False,
            progress: bool = True) -> Measurements:
    """Phase 1: quantize every linear at every candidate on float-model statistics (non-sequential), score
    blocks (LIM, ZD) and linears (output sensitivity on the first `sensitivity_batches` batches; 0 skips it)."""
    specs = candidate_specs(candidates)
    batches = resolve_calibration(calibration, tokenizer)
    if batches is None:
        raise LowbitError("mixed precision measures each layer's proxy loss on calibration data: pass "
                          "calibration=[batch, ...], a list of strings with tokenizer=..., or 'stdlib'")
    blocks_name, blocks = find_blocks(model)
    prefixes = [f"{blocks_name}.{i}" for i in range(len(blocks))]
    infos, excluded, records = {}, {}, {} if keep_records else None

    def quantize_layers(linears, stats):
        groups = {}
        for fqn, lin in linears.items():
            pinned, pin = resolve_pin(pins, fqn)
            if not pinned and any(re.fullmatch(p[3:], fqn) for p in DEFAULT_FLOAT_PATTERNS):
                excluded[fqn] = "output head kept in float by default (pin it to include it in the plan)"
                continue
            st = stats.get(fqn)
            if st is None and (not pinned or (pin is not None and pin.needs_calibration)):
                excluded[fqn] = "no calibration data reached this layer"
                continue
            h = None if st is None else st.hessian
            info = LinearInfo(fqn, next((p for p in prefixes if fqn.startswith(p + ".")), ""),
                              groups.setdefault(id(h), fqn), (lin.out_features, lin.in_features),
                              lin.weight.element_size() * 8 * lin.weight.numel(), pinned, pin,
                              0.0 if h is None else output_energy(lin.weight, h))
            todo = specs if not pinned else ({} if pin is None else {PIN: pin})
            info.results, recs = measure_candidates(fqn, lin.weight, h, todo, seed, getattr(st, "sample", None),
                                                    getattr(st, "absmax", None))
            if records is not None:
                records.update({(fqn, name): r for name, r in recs.items()})
            infos[fqn] = info
        return {}  # nothing is swapped in: every block sees float inputs

    summary = calibrate_blocks(model, batches, quantize_layers, sequential=False, progress=progress)
    if sensitivity_batches > 0 and infos:
        sens = output_sensitivity(model, batches[:sensitivity_batches], list(infos), seed=seed)
        for fqn, info in infos.items():
            info.sensitivity = sens[fqn]
    order = {f: i for i, f in enumerate(named_linears(model))}
    linears = dict(sorted(infos.items(), key=lambda kv: order[kv[0]]))
    return Measurements(specs, linears, excluded, lim_scores(summary) if summary.lim else {},
                        zd_scores(model) if blocks else {}, summary.as_dict(), records)


# ----------------------------------------------------------------------------- phase 2: the plan


def layer_loss(info: LinearInfo, name: str, kind: str = "output") -> float:
    """The loss the solver minimizes for one linear at one candidate (see LOSSES)."""
    proxy = info.results[name].proxy_loss
    if kind == "output":
        if info.sensitivity is None:
            raise LowbitError(f"layer {info.fqn}: loss='output' needs output sensitivities; measure with "
                              f"sensitivity_batches > 0, or use loss='proxy'")
        return proxy * info.sensitivity
    if kind == "relative":
        return proxy / info.energy if info.energy > 0 else 0.0
    if kind == "proxy":
        return proxy
    raise LowbitError(f"loss must be one of {sorted(LOSSES)}, got {kind!r}")


def build_units(meas: Measurements, unit: str = "linear", loss: str = "output") -> list[Unit]:
    """Solver units: free linears grouped by `unit` ("group": linears sharing one input; "block": a repeated
    block; linears outside blocks stay single); a pinned linear is a unit of its own with one option. Option
    payloads map each member fqn to its LayerSpec (None: float)."""
    if unit not in UNITS:
        raise LowbitError(f"unit must be one of {UNITS}, got {unit!r}")
    units, groups = [], {}
    for fqn, info in meas.linears.items():
        if info.pinned:
            r = info.results.get(PIN)
            opt = (Option("float", info.float_bits, 0.0, {fqn: None}) if r is None else
                   Option(_spec_name(meas, info.pin), r.bits, layer_loss(info, PIN, loss), {fqn: info.pin}))
            units.append(Unit(fqn, info.weights, (opt,)))
            continue
        key = {"linear": fqn, "group": info.group, "block": info.block or fqn}[unit]
        groups.setdefault(key, []).append(info)
    for key, members in groups.items():
        options = tuple(Option(name, sum(m.results[name].bits for m in members),
                               math.fsum(layer_loss(m, name, loss) for m in members),
                               {m.fqn: spec for m in members})
                        for name, spec in meas.candidates.items())
        units.append(Unit(key, sum(m.weights for m in members), options))
    return units


def _spec_name(meas: Measurements, spec: LayerSpec) -> str:
    return next((n for n, s in meas.candidates.items() if s == spec), spec.describe())


@dataclass
class PlanReport:
    """What the solver decided and from what: per linear its format, stored bits and every candidate's loss."""

    target_bpw: float
    unit: str
    loss: str
    candidates: list
    rows: list  # one dict per planned linear, in model order
    excluded: dict  # fqn -> why it stays float outside the plan
    lim: dict
    zd: dict
    bits: int  # stored bits of the planned linears
    budget: int
    weights: int
    predicted_loss: float
    exact: bool  # the solver proved the plan optimal for its losses

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights

    def as_dict(self) -> dict:
        """JSON-ready; pipeline.quantize_mixed stores it in checkpoint.meta["mixed"]."""
        keys = ("target_bpw", "unit", "loss", "candidates", "rows", "excluded", "lim", "zd", "bits", "budget",
                "weights", "predicted_loss", "exact")
        return {k: getattr(self, k) for k in keys} | {"bits_per_weight": self.bits_per_weight}

    def table(self) -> str:
        head = ["layer", "shape", "format", "bits/w", *(f"{self.loss} loss {c}" for c in self.candidates),
                "LIM", "ZD"]
        rows = [head]
        for r in self.rows:
            losses = [f"{r['losses'][c]:.3g}" if c in r["losses"] else "" for c in self.candidates]
            rows.append([r["fqn"], "x".join(map(str, r["shape"])), r["format"] + (" (pinned)" if r["pinned"] else ""),
                         f"{r['bits_per_weight']:.3f}", *losses, _num(self.lim.get(r["block"])),
                         _num(self.zd.get(r["block"]))])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"target {self.target_bpw} bits/weight, planned {self.bits_per_weight:.4f} (codes, scales and "
                     f"sign bits as stored) over {self.weights} weights; unit={self.unit}, loss={self.loss}; "
                     f"{'optimal' if self.exact else 'heuristic: branch and bound stopped at its node limit'}")
        lines += [f"{f}: float, outside the budget ({why})" for f, why in self.excluded.items()]
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """PNG: bits per linear over its candidate losses, and LIM/ZD per block (plot.plot_plan)."""
        from .plot import plot_plan

        return plot_plan(self.as_dict(), path)


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"


def plan_from(meas: Measurements, target_bpw: float, unit: str = "linear", loss: str = "output"):
    """Phase 2: (plan: fqn -> LayerSpec | None for every planned or excluded linear, PlanReport)."""
    units = build_units(meas, unit, loss)
    alloc = solve(units, target_bpw)
    plan = dict.fromkeys(meas.excluded)
    chosen = {}
    for u in units:
        opt = alloc.choice[u.name]
        for fqn, spec in opt.payload.items():
            plan[fqn], chosen[fqn] = spec, opt.name
    rows = []
    for fqn, info in meas.linears.items():
        key = PIN if info.pinned else chosen[fqn]
        bits = info.float_bits if plan[fqn] is None else info.results[key].bits
        rows.append({"fqn": fqn, "block": info.block, "shape": list(info.shape), "format": chosen[fqn],
                     "bits_per_weight": bits / info.weights, "pinned": info.pinned,
                     "sensitivity": info.sensitivity,
                     "proxy_losses": {n: r.proxy_loss for n, r in info.results.items() if n != PIN},
                     "losses": {n: layer_loss(info, n, loss) for n in info.results if n != PIN}})
    report = PlanReport(float(target_bpw), unit, loss, list(meas.candidates), rows, dict(meas.excluded),
                        dict(meas.lim), dict(meas.zd), alloc.bits, alloc.budget, alloc.weights, alloc.loss,
                        alloc.exact)
    return plan, report


def plan_recipe(plan: Mapping[str, LayerSpec | None], target_bpw: float, seed: int = 0) -> Recipe:
    """The Recipe that applies a plan through lb.quantize: one exact-name override per linear, default float."""
    return Recipe(name=f"{target_bpw}bpw", default=None, overrides=tuple(plan.items()), seed=seed)


def plan_mixed(model: torch.nn.Module, calibration, target_bpw: float, candidates=DEFAULT_CANDIDATES,
               unit: str = "linear", pins=None, *, tokenizer=None, seed: int = 0, loss: str = "output",
               progress: bool = True):
    """Measure (phase 1) and solve (phase 2): (plan fqn -> LayerSpec | None, PlanReport)."""
    meas = measure(model, calibration, candidates, pins, tokenizer=tokenizer, seed=seed,
                   sensitivity_batches=4 if loss == "output" else 0, progress=progress)
    return plan_from(meas, target_bpw, unit, loss)
