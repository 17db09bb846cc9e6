"""The torch.compile backend: `torch.compile(model, backend="lowbit", options={...})`.

Dynamo hands us the graph with the model's parameters as placeholders (their example inputs are the very
nn.Parameter objects). We tag the linears, quantize each weight (cached by tensor identity and version,
so a recompile for a new shape does not quantize again) or take it from a checkpoint, rewrite the linears
to `lowbit::rotated_linear` / `lowbit::fp4_linear` (integer layers with CPU weights take the CPU fast path
`lowbit::int4pack_linear` unless options kernels="reference"), fold FP4 activation exponents into their producers
(passes/fold_act_scales.py: folded copies of norm weights and FP4 row scales become constants of the graph;
the model's own parameters are never modified) and hand the graph to Inductor. Recipes that need
calibration data and come without a checkpoint are calibrated on the first call's inputs (observers
inserted, one run, removed); FP4 layers fed the same input are quantized together (shared exponents).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels  # noqa: F401  (registers lowbit::*)
from .checkpoint import Checkpoint
from .errors import LowbitError
from .memory import TRIM_SLACK, release_freed_memory
from .passes import (
    FindLinears,
    FoldActScales,
    FP4FastPath,
    InsertObservers,
    RewriteLinears,
    count_quantized,
    linear_sites,
    observed_stats,
    remove_observers,
)
from .passes.base import get_attr_tensor
from .passes.find_linears import TAG
from .passes.rewrite_linears import KERNELS, pack_for_cpu
from .quantize.layer import check_group_size, quantize_fp4_group, quantize_weight
from .recipe import Recipe
from .report import LayerReport, Report

log = logging.getLogger("lowbit_compile")

COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class BackendSettings:
    """options={...} of torch.compile(backend="lowbit"). Unknown keys are an error."""

    recipe: Any = "w4"  # a recipe string ("w4", "w2-quip", ...) or a Recipe
    checkpoint: Any = None  # a Checkpoint from lb.quantize, or the folder it was saved to
    overrides: dict | None = None  # {fqn | "re:pattern" | "_default": recipe string or None}
    seed: int = 0  # seed of every random transform (per layer: hash of seed and layer name)
    compiler: str = "inductor"  # "inductor", or "eager" to run the rewritten graph without Inductor
    kernels: str = "auto"  # "auto": CPU fast paths chosen by what the CPU has (kernels/cpu_caps.py); "reference"
    fallback: bool = False  # on a LowbitError keep the float graph with a warning instead of raising
    verbose: bool = False  # print the per-layer table (it is always logged at INFO level)
    _recipe: Recipe = field(init=False, repr=False, compare=False)
    _checkpoint: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.compiler not in COMPILERS:
            raise LowbitError(f"option compiler={self.compiler!r}: valid values are {COMPILERS}")
        if self.kernels not in KERNELS:
            raise LowbitError(f"option kernels={self.kernels!r}: valid values are {KERNELS}")
        object.__setattr__(self, "_recipe", Recipe.parse(self.recipe, self.overrides, self.seed))
        ckpt = self.checkpoint
        if isinstance(ckpt, (str, os.PathLike)):
            ckpt = Checkpoint.load(os.fspath(ckpt))
        elif ckpt is not None and not isinstance(ckpt, Checkpoint):
            raise LowbitError(f"option checkpoint: expected a Checkpoint or a folder path, got "
                              f"{type(ckpt).__name__}")
        object.__setattr__(self, "_checkpoint", ckpt)
        if self._recipe.target_bpw is not None and ckpt is None:
            raise LowbitError(f"recipe {self._recipe.name!r} is a mixed-precision budget: the plan measures every "
                              f"layer of the whole model, which a compiled graph does not show; run "
                              f"ckpt = lb.quantize(model, {self._recipe.name!r}, calibration) and pass "
                              f"options={{'checkpoint': ckpt}}")

    @classmethod
    def from_options(cls, options: dict | None) -> BackendSettings:
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise LowbitError(f"unknown lowbit option(s) {unknown}; valid options: {valid}")
        return cls(**options)


class _WeightCache:
    """Quantized records keyed by (weight identity, layer, spec, seed); invalid once the weight changes."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}
        self.quantized = 0  # how many times a weight was actually quantized
        self.hits = 0

    def get(self, w: torch.Tensor, key: tuple, make):
        k = (id(w), *key)
        hit = self._entries.get(k)
        if hit is not None and hit[0]() is w and hit[1] == w._version:
            self.hits += 1
            return hit[2], True
        rec = make()
        self._entries[k] = (weakref.ref(w), w._version, rec)
        self.quantized += 1
        return rec, False

    def clear(self):
        self._entries.clear()
        self.quantized = self.hits = 0


CACHE = _WeightCache()
REPORTS: list[Report] = []
_calibration_logged = False


def reset() -> None:
    """Forget cached quantized weights and past reports (call with torch._dynamo.reset())."""
    global _calibration_logged
    CACHE.clear()
    REPORTS.clear()
    _calibration_logged = False


def _weight_value(gm: torch.fx.GraphModule, node: torch.fx.Node, examples: dict[str, torch.Tensor]):
    return get_attr_tensor(gm, node) if node.op == "get_attr" else examples[node.name]


def _first_call_hessians(gm: torch.fx.GraphModule, example_inputs) -> dict:
    """Calibrate on the inputs of the call being compiled: observers in, one eager run, observers out."""
    global _calibration_logged
    InsertObservers()(gm)
    try:
        with torch.no_grad():
            gm(*example_inputs)
        stats = dict(observed_stats(gm))
    finally:
        remove_observers(gm)
    if not _calibration_logged:
        tokens = max((a.tokens for a in stats.values()), default=0)
        log.warning("lowbit: calibrating on the first call's inputs (%d tokens); for better quality quantize "
                    "once with lb.quantize(model, recipe, calibration=...) and pass options={'checkpoint': ...}",
                    tokens)
        _calibration_logged = True
    return stats


def _calls_linear_module(node: torch.fx.Node) -> bool:
    """The linear is the forward of an nn.Linear module (lb.quantize plans every one of those)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    _, cls = list(stack.values())[-1]
    return isinstance(cls, type) and issubclass(cls, torch.nn.Linear)


def _from_checkpoint(ckpt: Checkpoint, site, shape, report: Report, records: dict) -> None:
    rec = ckpt.records.get(site.fqn)
    if rec is None:
        why = next((p.get("reason", "") for p in ckpt.plan if p["fqn"] == site.fqn), "")
        reason = f"float in the checkpoint: {why}" if why else "not in the checkpoint"
        report.layers.append(LayerReport(site.fqn, shape, "float", reason=reason))
        return
    records[site.fqn] = rec
    report.layers.append(LayerReport(site.fqn, shape, "quantized", f"{rec.fmt} {rec.method}",
                                     rec.bits_per_weight(), rec.weight_error, "checkpoint"))


def _match_checkpoint(ckpt: Checkpoint, sites: list, weight_of) -> list:
    """Give each linear of the graph the name of its checkpoint layer (Checkpoint.match: by name, by the name's
    ending, by the weight's digest) and refuse a checkpoint made for another model, listing every difference."""
    by_name = {s.fqn: s for _, s in sites}
    names, tried = ckpt.match({s.fqn: (s.out_features, s.in_features) for _, s in sites},
                              weight=lambda fqn: weight_of(by_name[fqn]))
    renamed = []
    for node, site in sites:
        if names.get(site.fqn, site.fqn) != site.fqn:
            site = node.meta[TAG] = dataclasses.replace(site, fqn=names[site.fqn])
        renamed.append((node, site))
    ckpt.check({s.fqn: (s.out_features, s.in_features) for _, s in renamed}, whole_model=False,
               must_match=[s.fqn for n, s in renamed if _calls_linear_module(n)], where="the compiled graph",
               tried=tried)
    return renamed


def quantize_graph(gm: torch.fx.GraphModule, example_inputs, settings: BackendSettings):
    """Tag, quantize (or take from the checkpoint) and rewrite the linears of a Dynamo graph."""
    recipe, ckpt = settings._recipe, settings._checkpoint
    FindLinears()(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = {n.name: t for n, t in zip(placeholders, example_inputs)}
    nodes = {n.name: n for n in gm.graph.nodes}
    report = Report()
    records = {}
    stats = None
    fp4_done: dict = {}  # FP4 records of this graph, made group by group

    def weight_of(site):
        w = _weight_value(gm, nodes[site.weight_node], examples)
        if not isinstance(w, torch.Tensor) or w.is_meta or type(w).__name__ == "FakeTensor":
            raise LowbitError(f"layer {site.fqn}: the backend received no real weight tensor for "
                              f"{site.weight_name}; compile the model itself, not a functional wrapper")
        return w

    def make(w, fqn, spec):
        nonlocal stats
        if spec.needs_calibration and stats is None:  # only on a cache miss: a recompile never calibrates again
            stats = _first_call_hessians(gm, example_inputs)
        if spec.method == "fp4":
            if fqn not in fp4_done:  # the whole group of FP4 linears fed the same input, at once
                acc = stats[fqn]
                group = {}
                for _, s in linear_sites(gm):
                    s_spec = recipe.spec_for(s.fqn)[0]
                    if stats.get(s.fqn) is acc and s_spec is not None and s_spec.method == "fp4":
                        group[s.fqn] = (weight_of(s), s_spec)
                fp4_done.update(quantize_fp4_group(group, acc.sample, acc.absmax, recipe.seed))
                release_freed_memory(TRIM_SLACK)
            return fp4_done[fqn]
        hessian = stats[fqn].hessian() if spec.needs_calibration else None
        rec = quantize_weight(fqn, w, spec, recipe.seed, hessian=hessian)
        del hessian
        settle(rec)
        return rec

    def settle(rec):
        """Pack the layer for its CPU kernel now (RewriteLinears takes it from the packing cache) and trim the heap:
        done layer by layer, the peak holds one layer's temporaries, not every layer's."""
        pack_for_cpu(rec, settings.kernels)
        release_freed_memory(TRIM_SLACK)

    sites = linear_sites(gm)
    if ckpt is None:  # a bad weight or group size fails before the first call is calibrated, not after
        for _, site in sites:
            spec = recipe.spec_for(site.fqn)[0]
            if spec is not None:
                check_group_size(site.fqn, site.in_features, spec)
    if ckpt is not None:
        sites = _match_checkpoint(ckpt, sites, weight_of)
    for _, site in sites:
        shape = (site.out_features, site.in_features)
        if ckpt is not None:
            _from_checkpoint(ckpt, site, shape, report, records)
            if site.fqn in records:
                settle(records[site.fqn])
            continue
        spec, why = recipe.spec_for(site.fqn)
        if spec is None:
            report.layers.append(LayerReport(site.fqn, shape, "float", reason=why))
            continue
        w = weight_of(site)
        rec, cached = CACHE.get(w, (site.fqn, spec, recipe.seed),
                                lambda w=w, fqn=site.fqn, spec=spec: make(w, fqn, spec))
        records[site.fqn] = rec
        report.layers.append(LayerReport(site.fqn, shape, "quantized", spec.describe(), rec.bits_per_weight(),
                                         rec.weight_error, why, cached))
    if not report.layers:
        report.notes.append("no linear layer with a constant weight in this graph: nothing was quantized")
    if records:
        rewrite = RewriteLinears(records, settings.kernels)
        rewrite(gm)
        for layer in report.layers:
            layer.runtime = rewrite.runtimes.get(layer.fqn, "")
        for reason in sorted(set(rewrite.reasons.values())):
            n = sum(r == reason for r in rewrite.reasons.values())
            report.notes.append(f"CPU kernel of {n} integer layer(s): {reason}")
        fold = FoldActScales()
        fold(gm)
        report.notes.extend(fold.notes)
        if settings.kernels == "auto":  # FP4 linears in their final (folded) form onto the CPU int4 kernel
            fast = FP4FastPath()
            fast(gm)
            for layer in report.layers:
                layer.runtime = fast.runtimes.get(layer.fqn, layer.runtime)
    for rec in records.values():
        report.notes.extend(getattr(rec, "notes", ()))
    report.records = records
    report.rewritten = count_quantized(gm)
    if records:
        release_freed_memory()  # the int4pack packing's temporaries (and the last layer's)
    return gm, report


def _register_constants(gm: torch.fx.GraphModule) -> None:
    """Dynamo graphs map every parameter/buffer to a source; give our new buffers one too."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in gm.named_buffers():
        if name.startswith("_lowbit_") and name not in table:
            table[name] = ConstantSource("__lowbit_" + name)


def lowbit_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """torch.compile backend. Dynamo passes module parameters as graph inputs and may reuse one graph for many
    modules: after a graph break inside `for block in self.layers`, Block.forward is compiled once and called
    with each block's parameters. The quantized weights are constants of the compiled graph, so the result
    is keyed by the identity of its parameter inputs: a call with other parameters quantizes and compiles a
    variant for them (from a float copy of the graph) instead of running another layer's weights."""
    if kwargs:
        raise LowbitError(f"torch.compile(backend='lowbit') takes options={{...}}; got {sorted(kwargs)}")
    settings = BackendSettings.from_options(options)
    if settings.verbose:
        from . import quiet

        quiet.uninstall()
    params = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    if not params:
        return _compile_one(gm, example_inputs, settings)
    float_gm = copy.deepcopy(gm)  # parameters are inputs, not attributes: a graph-only copy
    first = _compile_one(gm, example_inputs, settings)
    variants = {tuple(id(example_inputs[i]) for i in params): (first, [weakref.ref(example_inputs[i]) for i in params])}

    def run(*args):
        key = tuple(id(args[i]) for i in params)
        hit = variants.get(key)
        if hit is None or any(ref() is not args[i] for ref, i in zip(hit[1], params)):
            compiled = _compile_one(copy.deepcopy(float_gm), list(args), settings)
            hit = variants[key] = (compiled, [weakref.ref(args[i]) for i in params])
        return hit[0](*args)

    return run


def _compile_one(gm: torch.fx.GraphModule, example_inputs, settings: BackendSettings):
    try:
        gm, report = quantize_graph(gm, example_inputs, settings)
    except LowbitError as e:
        if not settings.fallback:
            raise
        warnings.warn(f"lowbit: {e}; running this graph in float (fallback=True)", stacklevel=2)
        report = Report(notes=[f"fallback to float: {e}"])
    REPORTS.append(report)
    if not report.layers and not any(n.startswith("fallback") for n in report.notes):
        warnings.warn("lowbit: no linear layers with constant weights found in this graph; nothing was "
                      "quantized", stacklevel=2)
    if settings.verbose:
        print(report.table())
    log.info("lowbit graph report:\n%s", report.table())
    _register_constants(gm)
    if settings.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
