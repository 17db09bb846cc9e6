"""What both exporters share: the user's example inputs and records (split them, find which dimensions the model
lets vary), the outputs they compare (every tensor of the output tree, `max_rel_error`) and the result they return
(`ExportResult`; the ExecuTorch exporter's PteExport adds what only a .pte has).

Dynamic dimensions. A guess by position (dimension 1 = sequence) breaks a plain MLP, whose input is (batch,
features): the features dimension is fixed by the first weight. So the exporters ask the model: `free_dims`
traces the float model once with `torch.export.Dim.AUTO` on dimensions 0 and 1 of every input tensor (AUTO
keeps a dimension symbolic where the model allows it and specializes it without an error where it does not),
and the program is then exported with exactly the dimensions that stayed symbolic made dynamic. torch.export
specializes a dimension of size 1, so where every input has size 1 in dimension 0 (or 1) the probe, and the
export, trace an example repeated to size 2 along it, if the model runs that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..errors import LowbitError

CANDIDATE_DIMS = (0, 1)  # batch and sequence, where a model has them


def quantized_weights(records: Mapping) -> int:
    return sum(r.in_features * r.out_features for r in records.values())


EXPORTABLE_KINDS = ("int", "fp4", "e8")  # record kinds both exporters have routes for


def records_of(records_or_checkpoint) -> Mapping:
    """{fqn: record} from a Checkpoint or such a mapping; LowbitError for a record kind the exporters cannot write
    (before any work: a record of another kind read as integer codes would be caught only by the verification, or
    not at all with verify=False)."""
    recs = getattr(records_or_checkpoint, "records", records_or_checkpoint)
    if not isinstance(recs, Mapping):
        raise LowbitError(f"expected a mapping {{layer FQN: record}} or a Checkpoint, got "
                          f"{type(records_or_checkpoint).__name__}")
    other = sorted(f for f, r in recs.items() if getattr(r, "kind", "int") not in EXPORTABLE_KINDS)
    if other:
        kinds = sorted({recs[f].kind for f in other})
        raise LowbitError(f"{len(other)} layer(s) ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) hold "
                          f"{'/'.join(kinds)} records, which the .pte and .onnx exporters cannot write (they export "
                          f"{', '.join(EXPORTABLE_KINDS)} records); quantize those layers with one of those recipes "
                          f"for export, or run them through torch.compile(backend='lowbit')")
    return recs


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """(positional, keyword) inputs from a tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise LowbitError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                      f"inputs, got {type(example_inputs).__name__}")


def tensor_leaves(tree) -> list[torch.Tensor]:
    """Every tensor of an output (or input) tree in pytree order: the order both runtimes return outputs in."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def max_rel_error(ys: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """max over outputs of max|y − r| / max|r| (inf on a count or shape mismatch, or an integer output that
    differs)."""
    if len(ys) != len(refs):
        return math.inf
    err = 0.0
    for y, r in zip(ys, refs):
        if tuple(y.shape) != tuple(r.shape):
            return math.inf
        if not r.is_floating_point():
            err = max(err, 0.0 if torch.equal(y, r) else math.inf)
        elif r.numel():
            diff = float((y.to(r.dtype) - r).abs().max())
            err = max(err, diff / max(float(r.abs().max()), 1e-30) if diff == diff else math.inf)
    return err


def max_abs_error(ys: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """max over outputs of max|y − r| (inf on a count or shape mismatch)."""
    if len(ys) != len(refs) or any(tuple(y.shape) != tuple(r.shape) for y, r in zip(ys, refs)):
        return math.inf
    return max((float((y.to(torch.float64) - r.to(torch.float64)).abs().max()) for y, r in zip(ys, refs)
                if r.numel()), default=0.0)


@dataclass
class ExportResult:
    """What an exporter wrote, and how well the file matched the PyTorch quantized model on the example inputs
    (every output tensor compared; `error` and `max_abs_error` stay None with verify=False)."""

    path: Path
    nbytes: int  # the file, plus its external data where it has any
    routes: dict[str, str]  # layer FQN -> how the layer runs in the file (each exporter documents its routes)
    quantized_weights: int  # number of weights in the quantized layers
    dynamic_dims: list[str] = field(default_factory=list)  # e.g. "input_ids.1 in [2, 256]"
    error: float | None = None  # max over outputs of max|file − reference| / max|reference|
    max_abs_error: float | None = None  # max over outputs of max|file − reference|
    atol: float | None = None  # the tolerance the check used: |file − reference| ≤ atol + rtol·max|reference|
    rtol: float | None = None

    @property
    def file_bits_per_quantized_weight(self) -> float:
        """Every byte of the file over the quantized weights: an upper bound on what the weights cost."""
        return 8 * self.nbytes / self.quantized_weights


def widen_size_one_dims(model, args: tuple, kwargs: dict, dims=CANDIDATE_DIMS) -> tuple[tuple, dict, list[int]]:
    """The example repeated to size 2 along each dimension in `dims` where every input tensor that has it has size
    1, when the model runs on the widened example (a dimension of size 1 may also be a feature dimension a weight
    fixes). Returns (args, kwargs, the widened dimensions)."""
    widened = []
    for d in dims:
        tensors = [t for t in tensor_leaves((args, kwargs)) if t.dim() > d]
        if not tensors or any(t.shape[d] != 1 for t in tensors):
            continue

        def widen(t, d=d):
            return torch.cat([t, t], dim=d) if isinstance(t, torch.Tensor) and t.dim() > d else t

        w_args, w_kwargs = pytree.tree_map(widen, args), pytree.tree_map(widen, kwargs)
        try:
            with torch.no_grad():
                model(*w_args, **w_kwargs)
        except Exception:  # the model does not take it: that dimension stays as the example has it
            continue
        args, kwargs = w_args, w_kwargs
        widened.append(d)
    return args, kwargs, widened


def _spec(model, args: tuple, kwargs: dict, dims_of) -> tuple | dict | None:
    """A torch.export dynamic_shapes spec with `dims_of(tensor)` -> {dim: Dim} for every top-level input."""
    import inspect

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        return dims_of(t) or None

    if not kwargs:
        return tuple(spec(a) for a in args)
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**{params[i]: spec(a) for i, a in enumerate(args)}, **{k: spec(v) for k, v in kwargs.items()}}


def free_dims(model, args: tuple, kwargs: dict, dims=CANDIDATE_DIMS) -> dict[int, set[int]]:
    """{id(input tensor): the dimensions among `dims` that the model leaves free}, found by tracing `model` with
    Dim.AUTO on them (see the module docstring). Inputs of a model that cannot be traced at all get none (the
    exporter's own capture then reports why)."""
    from torch.export import Dim

    spec = _spec(model, args, kwargs, lambda t: {d: Dim.AUTO for d in dims if d < t.dim() and t.shape[d] > 1})
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False)
    except Exception:
        return {}
    order = ep.call_spec.in_spec.child(1).context if kwargs else []
    flat = tensor_leaves((args, {k: kwargs[k] for k in order if k in kwargs}))
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    if len(vals) != len(flat):
        return {}
    return {id(t): {i for i, s in enumerate(v.shape) if is_symbolic(s) and i in dims} for t, v in zip(flat, vals)}


def is_symbolic(size) -> bool:
    """A dimension of a traced tensor that varies (a SymInt of a specialized dimension is a number)."""
    expr = getattr(getattr(size, "node", None), "expr", None)
    return expr is not None and not expr.is_number


def dynamic_shapes_for(model, args: tuple, kwargs: dict, dim_for) -> tuple | dict | None:
    """The dynamic_shapes spec that makes exactly the free dimensions (`free_dims`) dynamic, each as
    `dim_for(index, size)` (e.g. a bounded Dim.AUTO); None when no dimension is free."""
    free = free_dims(model, args, kwargs)
    if not any(free.values()):
        return None
    return _spec(model, args, kwargs, lambda t: {d: dim_for(d, t.shape[d]) for d in sorted(free.get(id(t), ()))})
