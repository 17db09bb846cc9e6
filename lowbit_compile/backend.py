"""The torch.compile backend: `torch.compile(model, backend="lowbit", options={...})`.

Dynamo hands us the graph with the model's parameters as placeholders (their example inputs are the very
nn.Parameter objects). We tag the linears, quantize each weight (cached by tensor identity and version,
so a recompile for a new shape does not quantize again), rewrite the linears to `lowbit::rotated_linear`
and hand the graph to Inductor.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels  # noqa: F401  (registers lowbit::*)
from .errors import LowbitError
from .passes import FindLinears, RewriteLinears, count_quantized, linear_sites
from .quantize.layer import quantize_weight
from .recipe import Recipe
from .report import LayerReport, Report

log = logging.getLogger("lowbit_compile")

COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class BackendSettings:
    """options={...} of torch.compile(backend="lowbit"). Unknown keys are an error."""

    recipe: Any = "w4"  # a recipe string ("w4", "w2-rtn", ...) or a Recipe
    overrides: dict | None = None  # {fqn | "re:pattern" | "_default": recipe string or None}
    seed: int = 0  # seed of every random transform (per layer: hash of seed and layer name)
    compiler: str = "inductor"  # "inductor", or "eager" to run the rewritten graph without Inductor
    fallback: bool = False  # on a LowbitError keep the float graph with a warning instead of raising
    verbose: bool = False  # print the per-layer table (it is always logged at INFO level)
    _recipe: Recipe = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.compiler not in COMPILERS:
            raise LowbitError(f"option compiler={self.compiler!r}: valid values are {COMPILERS}")
        object.__setattr__(self, "_recipe", Recipe.parse(self.recipe, self.overrides, self.seed))

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


def reset() -> None:
    """Forget cached quantized weights and past reports (call with torch._dynamo.reset())."""
    CACHE.clear()
    REPORTS.clear()


def _weight_value(gm: torch.fx.GraphModule, node: torch.fx.Node, examples: dict[str, torch.Tensor]):
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return examples[node.name]


def quantize_graph(gm: torch.fx.GraphModule, example_inputs, settings: BackendSettings):
    """Tag, quantize and rewrite the linears of a Dynamo graph. Returns (gm, report)."""
    recipe = settings._recipe
    FindLinears()(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = {n.name: t for n, t in zip(placeholders, example_inputs)}
    nodes = {n.name: n for n in gm.graph.nodes}
    report = Report()
    records = {}
    for _, site in linear_sites(gm):
        spec, why = recipe.spec_for(site.fqn)
        shape = (site.out_features, site.in_features)
        if spec is None:
            report.layers.append(LayerReport(site.fqn, shape, "float", reason=why))
            continue
        if spec.needs_calibration:
            raise LowbitError(f"layer {site.fqn}: method {spec.method!r} needs calibration data, which this "
                              f"backend does not collect yet; use a data-free recipe such as 'w4'")
        w = _weight_value(gm, nodes[site.weight_node], examples)
        if not isinstance(w, torch.Tensor) or w.is_meta or type(w).__name__ == "FakeTensor":
            raise LowbitError(f"layer {site.fqn}: the backend received no real weight tensor for "
                              f"{site.weight_name}; compile the model itself, not a functional wrapper")
        rec, cached = CACHE.get(w, (site.fqn, spec, recipe.seed),
                                lambda w=w, fqn=site.fqn, spec=spec: quantize_weight(fqn, w, spec, recipe.seed))
        records[site.fqn] = rec
        report.layers.append(LayerReport(site.fqn, shape, "quantized", spec.describe(), rec.bits_per_weight(),
                                         rec.weight_error, why, cached))
    if not report.layers:
        report.notes.append("no linear layer with a constant weight in this graph: nothing was quantized")
    if records:
        RewriteLinears(records)(gm)
    report.records = records
    report.rewritten = count_quantized(gm)
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
    if kwargs:
        raise LowbitError(f"torch.compile(backend='lowbit') takes options={{...}}; got {sorted(kwargs)}")
    settings = BackendSettings.from_options(options)
    try:
        gm, report = quantize_graph(gm, example_inputs, settings)
    except LowbitError as e:
        if not settings.fallback:
            raise
        warnings.warn(f"lowbit: {e}; running this graph in float (fallback=True)", stacklevel=2)
        report = Report(notes=[f"fallback to float: {e}"])
    REPORTS.append(report)
    if not report.layers:
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
