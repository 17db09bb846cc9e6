"""The one per-layer quantize loop. Every front end gathers its linears and calls it: lb.quantize (pipeline.py, the
model's nn.Linear modules with calibration statistics per block), the torch.compile backend (the graph's linears,
statistics from observers on the first call) and, through lb.quantize, the mixed-precision plan.

    rows = quantize_linears(layers, recipe, cache=..., on_record=...)

A `Layer` is (fqn, float weight, statistics, group key); weight and statistics may be functions that give them;
statistics are a calibrate.LayerStats or a calibrate.HessianAccumulator (the backend's observers).
For each, in order: the recipe's spec (exact name, patterns, default; None keeps it float, with the reason), then:

- a spec that needs calibration data and has no statistics (no token reached the layer) stays float, reported;
- an FP4 spec joins its group: the layers fed the very same input tensor (the group key: calibrate.LayerStats
  .owner) are quantized together once the loop has seen them all (quantize.layer.quantize_fp4_group: one vector
  of per-channel activation exponents, so one folded producer serves them all);
- anything else is `quantize_weight(fqn, weight, spec, recipe.seed, hessian=...)`.

`cache(weight, key, make)` may return a record made earlier for the same weight (the backend keys records by weight
identity so a recompile never quantizes again); `on_record(fqn, record)` runs as soon as a layer's record exists
(the backend packs it for the CPU kernel there, lb.quantize swaps it into the model for sequential calibration);
the heap's freed pages go back to the OS after each layer (memory.release_freed_memory). Statistics given as a
function are asked for only when a layer needs them and the cache has no record: a recompile never calibrates.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..errors import LowbitError
from ..memory import TRIM_SLACK, release_freed_memory
from ..recipe import LayerSpec, Recipe
from .layer import check_group_size, check_weight, quantize_fp4_group, quantize_weight

log = logging.getLogger("lowbit_compile")
NO_DATA = "no calibration data reached this layer"


@dataclass
class Layer:
    """One linear to quantize: its name, float weight (or a zero-argument function returning it: then give its
    shape) and calibration statistics (calibrate.LayerStats, a zero-argument function returning them, or None)."""

    fqn: str
    weight: object
    stats: object = None
    group: str | None = None  # layers with the same key read the same input (FP4 groups); None: its own
    shape: tuple[int, int] | None = None  # (out_features, in_features); default: the weight's

    def __post_init__(self):
        if self.shape is None:
            self.shape = (self.weight.shape[0], self.weight.shape[1])

    def tensor(self) -> torch.Tensor:
        if callable(self.weight):
            self.weight = self.weight()
        return self.weight

    def statistics(self):
        if callable(self.stats):
            self.stats = self.stats()
        return self.stats


@dataclass
class Row:
    """What happened to one layer: its record, or why it stayed float."""

    fqn: str
    shape: tuple[int, int]  # (out_features, in_features)
    spec: LayerSpec | None  # None: kept in float
    reason: str  # why this spec (or float): the recipe's rule, or what was missing
    record: object = None
    cached: bool = False  # the record came from the cache
    notes: list = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.record is not None


def precheck(layers: Iterable[Layer], recipe: Recipe, weights: bool = True) -> None:
    """Fail before calibration, not after: every weight finite (weights=True) and every group size dividing its
    layer's inputs, for the layers the recipe quantizes."""
    for layer in layers:
        spec = recipe.spec_for(layer.fqn)[0]
        if spec is None:
            continue
        if weights:
            check_weight(layer.fqn, layer.tensor())
        check_group_size(layer.fqn, layer.shape[1], spec)


def _plain_cache(weight, key, make):
    return make(), False


class WeightCache:
    """Records keyed by (weight identity, layer, spec, seed), invalid once the weight changes (its version):
    `get(weight, key, make) -> (record, hit)` is the `cache` quantize_linears takes (the backend's: a recompile for
    a new shape never quantizes again). Weights are held weakly."""

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
        if rec is not None:  # None: nothing was made (no calibration data reached the layer)
            self._entries[k] = (weakref.ref(w), w._version, rec)
            self.quantized += 1
        return rec, False

    def clear(self):
        self._entries.clear()
        self.quantized = self.hits = 0


def quantize_linears(layers: Iterable[Layer], recipe: Recipe, *,
                     cache: Callable | None = None,
                     on_record: Callable[[str, object], None] | None = None) -> list[Row]:
    """Quantize `layers` by `recipe` (see the module docstring); one Row per layer, in the given order."""
    cache = cache or _plain_cache
    rows: list[Row] = []
    fp4: dict[str, list[tuple[Layer, Row]]] = {}
    for layer in layers:
        spec, why = recipe.spec_for(layer.fqn)
        row = Row(layer.fqn, layer.shape, spec, why)
        rows.append(row)
        if spec is None:
            continue
        if spec.method == "fp4":
            fp4.setdefault(layer.group or layer.fqn, []).append((layer, row))
            continue
        key = (layer.fqn, spec, recipe.seed)

        def make(layer=layer, spec=spec):
            st = layer.statistics() if spec.needs_calibration else None
            if spec.needs_calibration and (st is None or st.tokens == 0):
                return None
            try:
                return quantize_weight(layer.fqn, layer.tensor(), spec, recipe.seed, hessian=_hessian(st))
            except LowbitError as e:
                raise e if f"layer {layer.fqn}" in str(e) else LowbitError(f"layer {layer.fqn}: {e}") from None

        rec, row.cached = cache(layer.tensor(), key, make)
        _settle(row, rec, on_record)
    for members in fp4.values():
        _quantize_fp4(members, recipe, cache, on_record)
    return rows


def _hessian(st):
    """The statistics' Hessian: a LayerStats holds it, a calibrate.HessianAccumulator makes it when asked (one
    layer's at a time, not every layer's at once)."""
    if st is None:
        return None
    return st.hessian() if callable(st.hessian) else st.hessian


def _settle(row: Row, rec, on_record) -> None:
    if rec is None:
        row.spec, row.reason = None, NO_DATA
        log.warning("lowbit: layer %s received no calibration data; kept in float", row.fqn)
        return
    row.record = rec
    row.notes = list(getattr(rec, "notes", ()))
    if on_record is not None:
        on_record(row.fqn, rec)
    release_freed_memory(TRIM_SLACK)  # glibc keeps each layer's freed temporaries otherwise


def _quantize_fp4(members: list[tuple[Layer, Row]], recipe: Recipe, cache, on_record) -> None:
    """One FP4 group: the cached records when every member has one, else the whole group quantized at once."""
    made: dict[str, object] = {}

    def make_group():
        st = members[0][0].statistics()
        if st is None or st.tokens == 0:
            return {}
        return quantize_fp4_group({layer.fqn: (layer.tensor(), row.spec) for layer, row in members}, st.sample,
                                  st.absmax, recipe.seed)

    for layer, row in members:
        def make(fqn=layer.fqn):
            if not made:
                made.update(make_group() or {None: None})
            return made.get(fqn)

        rec, row.cached = cache(layer.tensor(), (layer.fqn, row.spec, recipe.seed), make)
        _settle(row, rec, on_record)
        for note in row.notes:
            log.warning("lowbit: %s", note)


# ----------------------------------------------------------------------------- embeddings


@dataclass
class Embedding:
    """A token embedding (num_embeddings × dim weight) and the linears that use the very same weight (tied heads:
    {name: (out_features, in_features)})."""

    fqn: str
    weight: torch.Tensor
    heads: dict = field(default_factory=dict)


def quantize_embeddings(embeddings: Iterable[Embedding], recipe: Recipe, heads_named=None) -> tuple[dict, dict]:
    """RTN-quantize every embedding an override names (recipe.override_for; an exact name must give an unrotated
    integer recipe, a pattern that gives another kind leaves the embedding float with the reason). A tied head left
    float shares the embedding's record; a tied head named for quantization of its own is an error (one weight, two
    formats). Returns ({fqn: record}, {fqn: plan entry}); a head's entry has "shares": the embedding's name."""
    heads_named = heads_named or (lambda name: recipe.override_for(name)[0])
    records, entries = {}, {}
    for e in embeddings:
        named, spec, why = recipe.override_for(e.fqn)
        if not named or spec is None:
            continue
        entry = {"fqn": e.fqn, "shape": list(e.weight.shape), "module": "embedding"}
        if spec.method != "rtn" or spec.rotate:
            if why == f"override {e.fqn!r}":
                raise LowbitError(f"embedding {e.fqn}: {spec.describe()} rotates or adapts rows, but an embedding "
                                  f"gathers single rows, which cannot be un-rotated; give it an unrotated recipe, "
                                  f"e.g. overrides={{{e.fqn!r}: 'w4-rtn-g32'}} or 'w8-rtn'")
            entries[e.fqn] = {**entry, "spec": "float", "reason": f"{why} gives {spec.describe()}, which an embedding "
                                                                  f"cannot use (name it with an unrotated recipe such "
                                                                  f"as 'w4-rtn-g32')"}
            continue
        rec = quantize_weight(e.fqn, e.weight, spec, recipe.seed)
        records[e.fqn] = rec
        entries[e.fqn] = {**entry, "spec": spec.describe(), "reason": why}
        for head, shape in e.heads.items():
            if heads_named(head):
                raise LowbitError(f"{head} and embedding {e.fqn} share one weight (tied) and both are named in the "
                                  f"overrides; name only {e.fqn!r}: {head} then shares its quantized table")
            records[head] = rec
            entries[head] = {"fqn": head, "shape": list(shape), "spec": spec.describe(),
                             "reason": f"shares the quantized embedding {e.fqn} (tied weights)", "shares": e.fqn}
        release_freed_memory(TRIM_SLACK)
    return records, entries
