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

import collections
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
    REWRITE,
    FindLinears,
    InsertObservers,
    PassContext,
    count_quantized,
    embedding_sites,
    layer_meta,
    linear_sites,
    observed_stats,
    remove_observers,
)
from .passes.base import FOLD, KERNEL_REASON, RUNTIME, get_attr_tensor
from .passes.find_linears import TAG
from .passes.rewrite_embeddings import operands
from .passes.rewrite_linears import KERNELS, pack_for_cpu
from .quantize.core import Embedding, Layer, WeightCache, precheck, quantize_embeddings, quantize_linears
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


CACHE = WeightCache()  # records by weight identity: a recompile for a new shape never quantizes again
MAX_REPORTS = 64
REPORTS: collections.deque[Report] = collections.deque(maxlen=MAX_REPORTS)  # the latest graphs' reports
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
               must_match=[s.fqn for _, s in renamed if s.module_call], where="the compiled graph",
               tried=tried)
    return renamed


def quantize_graph(gm: torch.fx.GraphModule, example_inputs, settings: BackendSettings):
    """Tag, quantize (the core, quantize/core.py; or take from the checkpoint) and rewrite the linears of a Dynamo
    graph."""
    recipe, ckpt = settings._recipe, settings._checkpoint
    FindLinears()(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = {n.name: t for n, t in zip(placeholders, example_inputs)}
    nodes = {n.name: n for n in gm.graph.nodes}
    report = Report()
    records = {}

    def weight_of(site):
        w = _weight_value(gm, nodes[site.weight_node], examples)
        if not isinstance(w, torch.Tensor) or w.is_meta or type(w).__name__ == "FakeTensor":
            raise LowbitError(f"layer {site.fqn}: the backend received no real weight tensor for "
                              f"{site.weight_name}; compile the model itself, not a functional wrapper")
        return w

    def settle(fqn, rec):
        """Pack the layer for its CPU kernel as soon as it exists (RewriteLinears takes it from the packing cache):
        layer by layer, the peak holds one layer's temporaries, not every layer's."""
        records[fqn] = rec
        pack_for_cpu(rec, settings.kernels)

    sites = linear_sites(gm)
    if ckpt is not None:
        for _, site in _match_checkpoint(ckpt, sites, weight_of):
            _from_checkpoint(ckpt, site, (site.out_features, site.in_features), report, records)
            if site.fqn in records:
                settle(site.fqn, records[site.fqn])
                release_freed_memory(TRIM_SLACK)
    else:
        calibrated: dict = {}

        def stats_of(fqn):  # the first call's observers: run once, only when a layer needs data and is not cached
            if not calibrated:
                calibrated.update(_first_call_hessians(gm, example_inputs))
            return calibrated.get(fqn)

        layers = [Layer(s.fqn, lambda s=s: weight_of(s), lambda fqn=s.fqn: stats_of(fqn), group=node.args[0].name,
                        shape=(s.out_features, s.in_features)) for node, s in sites]
        precheck(layers, recipe, weights=False)  # a bad group size fails before the first call is calibrated
        block_steps = sorted({("fine-tuning" if sp.finetune else "bias correction") for sp in
                              (recipe.spec_for(s.fqn)[0] for _, s in sites) if sp is not None
                              and (sp.finetune or sp.bias_correct)})
        if block_steps:
            log.warning("lowbit: recipe %s asks for %s, which runs block by block in lb.quantize; the backend "
                        "quantizes each layer on its own without it. For the recipe's full quality, quantize with "
                        "lb.quantize and compile with options={'checkpoint': FOLDER}", recipe.name,
                        " and ".join(block_steps))
        for row in quantize_linears(layers, recipe, cache=CACHE.get, on_record=settle):
            if row.quantized:
                report.layers.append(LayerReport(row.fqn, row.shape, "quantized", row.spec.describe(),
                                                 row.record.bits_per_weight(), row.record.weight_error, row.reason,
                                                 row.cached))
            else:
                report.layers.append(LayerReport(row.fqn, row.shape, "float", reason=row.reason))
    _embeddings(gm, sites, ckpt, recipe, examples, weight_of, report, records)
    if not report.layers:
        report.notes.append("no linear layer with a constant weight in this graph: nothing was quantized")
    if records:
        REWRITE(gm, PassContext(records, settings.kernels))
        done = layer_meta(gm)
        for layer in report.layers:
            layer.runtime = done.get(layer.fqn, {}).get(RUNTIME, "")
        reasons = [m[KERNEL_REASON] for m in done.values() if KERNEL_REASON in m]
        report.notes += [f"CPU kernel of {reasons.count(r)} integer layer(s): {r}" for r in sorted(set(reasons))]
        report.notes += [f"layer {fqn}: {m[FOLD]}" for fqn, m in done.items() if FOLD in m]
    for rec in records.values():
        report.notes.extend(getattr(rec, "notes", ()))
    report.records = weakref.WeakValueDictionary(records)  # the graph and the weight cache keep them, not reports
    report.rewritten = count_quantized(gm)
    if records:
        release_freed_memory()  # the packing's temporaries (and the last layer's)
    return gm, report


def _embeddings(gm, sites, ckpt, recipe, examples, weight_of, report, records) -> None:
    """The graph's token embeddings with a record: from the checkpoint (matched as linears are), or quantized when the
    recipe's overrides name them (quantize/core.quantize_embeddings); a tied head left float then shares the record.
    Adds them to `records` (the pass list's RewriteEmbeddings rewrites them) and to the report."""
    emb = embedding_sites(gm)
    if not emb:
        return
    shapes = {s.fqn: (s.num_embeddings, s.embedding_dim) for _, s in emb}
    if ckpt is not None:
        weights = {s.fqn: examples.get(operands(n)[1].name) for n, s in emb}
        names, _ = ckpt.match(shapes, weight=weights.get)
        new = {f: ckpt.records[names[f]] for f in shapes if names.get(f) in ckpt.records}
        entries = {f: {"spec": f"{r.fmt} {r.method}", "reason": "checkpoint"} for f, r in new.items()}
    else:
        heads = {n.name: {s.fqn: (s.out_features, s.in_features) for _, s in sites if s.weight_node == n.name}
                 for n in (operands(node)[1] for node, _ in emb)}
        items = [Embedding(s.fqn, examples[operands(n)[1].name], heads[operands(n)[1].name]) for n, s in emb
                 if operands(n)[1].name in examples]
        new, entries = quantize_embeddings(items, recipe, heads_named=lambda h: recipe.override_for(h)[0])
    for fqn, rec in new.items():
        records[fqn] = rec
        report.layers = [r for r in report.layers if r.fqn != fqn]  # a tied head: its float row goes
        report.layers.append(LayerReport(fqn, (rec.out_features, rec.in_features), "quantized",
                                         entries[fqn]["spec"], rec.bits_per_weight(), rec.weight_error,
                                         entries[fqn]["reason"]))


def _register_constants(gm: torch.fx.GraphModule) -> None:
    """Dynamo graphs map every parameter/buffer to a source; give our new buffers one too."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in gm.named_buffers(remove_duplicate=False):
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
