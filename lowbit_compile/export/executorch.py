"""Export a quantized model to an ExecuTorch `.pte` that stores the low-bit weights and runs in the runtime.

    swap_linears (records → LowbitLinear): the PyTorch quantized model, the reference
      └─ decompose_lowbit_linears (decompose.py): the same layers in ops the runtime has
           └─ torch.export (dynamic batch / sequence) ─▶ check: no lowbit:: op left
                └─ to_edge_transform_and_lower + XNNPACK ─▶ to_executorch
                     └─ check: every op outside XNNPACK has a kernel in the runtime
                          └─ verify: run the program in executorch.runtime, compare ─▶ write the .pte

Tolerances (`verify`). An output y matches its reference r when max|y − r| ≤ atol + rtol·max|r|: relative to
the output's scale, since an elementwise rtol means nothing for entries near zero. The reference is the
PyTorch quantized model (swap_linears: the lowbit op's reference implementation).
- Packed route only (2/3-bit, and 4-bit layers XNNPACK cannot take): the program computes the reference's
  float32 math in another order (GEMM blocking, Kronecker blocks instead of butterflies), so only float
  rounding differs: we measure 1e-6 (1–2-layer Llama, 2-layer MiniLM). RTOL_FLOAT = 1e-4 leaves room for
  deeper models; a decoding, packing or rotation bug is an O(1) error.
- XNNPACK int4 route: activations are quantized to int8 per token on the fly (asymmetric, 255 levels), about
  0.1 % rms error per linear input, compounding through the layers; XNNPACK also stores the 4-bit block
  scales as bfloat16 (≤ 0.2 % per scale). We measure 1–2.5 % (tiny and 512-wide Llama, 2- and 6-layer
  MiniLM; torchao's own 8da4w file shows the same 2.3 % against its PyTorch model). RTOL_INT8_ACTIVATIONS =
  0.1 keeps 4× headroom and still catches structural bugs (a wrong sign, block or code is O(1)); pass a
  larger rtol for much deeper models. `error_vs_simulated` reports the distance to the int8-simulated model
  (the decomposed modules run in PyTorch with torchao's quantize/dequantize): 1e-6 on Llama, but ~1 % on
  MiniLM, where single int8 rounding flips move LayerNorm/GELU outputs by a step, so it is not enforced.
- FP4 (decompose.FP4TableLinear): weights decode exactly through the 16-entry table, and W4A4 layers round
  their activations in the graph bit for bit as the reference does given the same input, so both FP4 routes
  are float-rounding routes (RTOL_FLOAT; we measure 3e-7–9e-7 on 1–2-layer Llama and the 6-layer MiniLM,
  fp4, fp4-rot, w4a16-fp4). One W4A4 caveat: the input of a W4A4 layer comes from float ops computed in
  another order, and an activation within float rounding of an FP4 rounding midpoint may land on the other
  neighbour; that one flip moves the outputs by 3–70 % of their maximum (measured on the same models), far
  beyond any tolerance that still catches bugs, and it does happen (one in each fp4 export of
  bench/export_size.py). So a W4A4 mismatch is accepted only when a few such flips explain it exactly
  (fp4_flips.py: the flipped reference matches at RTOL_FLOAT); they are listed in `rounding_flips`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LowbitError
from ..io import atomic_write_bytes
from ..nn import swap_linears
from ..quiet import known_warnings
from .decompose import decompose_lowbit_linears
from .fp4_flips import MAX_FLIPS, explain_by_flips
from .inputs import dynamic_shapes_for, is_symbolic, records_of, split_inputs, tensor_leaves, widen_size_one_dims

# Ops the packed route needs that are not core ATen; the ExecuTorch runtime has kernels for them.
EXTRA_EDGE_OPS = (
    torch.ops.aten.bitwise_right_shift.Tensor_Scalar,
    torch.ops.aten.bitwise_right_shift.Tensor,
)

ATOL = 1e-5
RTOL_FLOAT = 1e-4
RTOL_INT8_ACTIVATIONS = 0.1
# The default rtol of a program is the largest of its routes'. W4A4 FP4 is checked at the float tolerance, and a
# mismatch is accepted only when a few activations rounded the other way at an FP4 rounding midpoint explain it.
ROUTE_RTOL = {"packed": RTOL_FLOAT, "fp4-a16": RTOL_FLOAT, "fp4-a4": RTOL_FLOAT,
              "xnnpack-int4": RTOL_INT8_ACTIVATIONS}

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ = 256


@dataclass
class PteExport:
    """What `export_pte` wrote, and how well the program matched the PyTorch quantized model."""

    path: Path
    nbytes: int
    routes: dict[str, str]  # layer FQN -> "xnnpack-int4" | "packed" | "fp4-a16" | "fp4-a4" (decompose.ROUTES)
    quantized_weights: int  # number of weights in the quantized linears
    dynamic_dims: list[str] = field(default_factory=list)  # e.g. "input_ids.1 in [2, 256]"
    delegates: int = 0  # XNNPACK subgraphs called by the program
    portable_ops: dict[str, int] = field(default_factory=dict)  # ops run by the runtime's own kernels: count
    error: float | None = None  # max over outputs of max|pte − reference| / max|reference|
    error_vs_simulated: float | None = None  # the same against the int8-activation simulated model
    # W4A4 FP4: activations the program rounded the other way at an FP4 rounding midpoint (fp4_flips.py), when
    # they explain a mismatch; `error` is still measured against the reference without them
    rounding_flips: list[str] = field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None

    @property
    def file_bits_per_quantized_weight(self) -> float:
        """Every byte of the file over the quantized weights: an upper bound on what the weights cost."""
        return 8 * self.nbytes / self.quantized_weights


# ----------------------------------------------------------------------------- inputs and outputs


def _flat_inputs(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The program's inputs in order: positional, then keywords in the order torch.export recorded."""
    if kwargs:
        order = ep.call_spec.in_spec.child(1).context
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
    return tensor_leaves((args, kwargs))


def _auto_dynamic_shapes(model, args: tuple, kwargs: dict, max_batch: int, max_seq: int):
    """The free batch / sequence dimensions of the inputs (inputs.free_dims: those the model lets vary), each a
    Dim.AUTO bounded by max_batch (dimension 0) or max_seq (dimension 1), or by the example's size where that is
    larger: ExecuTorch plans memory for the upper bounds."""
    from torch.export import Dim

    return dynamic_shapes_for(model, args, kwargs,
                              lambda d, size: Dim.AUTO(min=1, max=max(max_batch if d == 0 else max_seq, size)))


def _default_max_seq(model) -> int:
    mpe = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(DEFAULT_MAX_SEQ, mpe) if isinstance(mpe, int) and mpe > 0 else DEFAULT_MAX_SEQ


def _dynamic_dims(ep: torch.export.ExportedProgram) -> list[str]:
    out = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        for i, d in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if is_symbolic(d):
                rng = ep.range_constraints.get(d.node.expr)
                out.append(f"{node.name}.{i} in [{rng.lower}, {rng.upper}]" if rng else f"{node.name}.{i}")
    return out


# ----------------------------------------------------------------------------- capture and checks


def _export_hints(e: Exception, strict: bool) -> str:
    text = str(e)
    hints = []
    if re.search(r"data.dependent|GuardOnDataDependent|Could not guard|item\(\)|nonzero", text, re.I):
        hints.append("the model branches on tensor values (data-dependent control flow): rewrite the branch "
                     "with torch.where / torch.cond, or move it out of forward()")
    if re.search(r"Constraints violated|specializ|not in range", text, re.I):
        hints.append("a dimension marked dynamic is fixed by the model: mark it static (dynamic_shapes=None, "
                     "or torch.export.Dim.STATIC for that dimension) or lower max_batch / max_seq")
    hints.append("try strict=False (non-strict tracing runs the Python code as is)" if strict else
                 "try strict=True, which points at the failing Python line for unsupported constructs")
    hints.append("try static shapes: dynamic_shapes=None")
    return "\n".join(f"  - {h}" for h in hints)


def _capture(model, args, kwargs, dynamic_shapes, strict: bool) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as e:  # torch.export raises many types; each is re-raised with what to try
        msg = str(e).strip()
        msg = msg if len(msg) <= 4000 else msg[:4000] + " ..."
        raise LowbitError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {msg}\n"
                          f"What to try:\n{_export_hints(e, strict)}") from e


def _layer_of(node: torch.fx.Node) -> str:
    """The FQN of the innermost module a node came from."""
    from ..passes.base import source_to_fqn

    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<unknown>"
    path, _ = list(stack.values())[-1]
    return source_to_fqn(path) or "<root>"


def _check_no_lowbit_ops(ep: torch.export.ExportedProgram) -> None:
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("lowbit."):
            raise LowbitError(
                f"node {node.name} ({node.target}) in layer {_layer_of(node)}: the ExecuTorch exporter has no "
                f"lowering for this op (it decomposes the lowbit linears made from QuantizedLinear and "
                f"FP4QuantizedLinear records, not lowbit ops called directly); keep that layer in float for "
                f"export, or run it through torch.compile(backend='lowbit')")


def _runtime_op_name(target) -> str | None:
    """'aten::add.out' for torch.ops.aten.add.out; None for targets that are not operators."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def _check_runtime_kernels(program: torch.export.ExportedProgram) -> tuple[int, dict[str, int]]:
    """Every op the program calls outside a delegate must have a kernel in the runtime (the one we verify
    with). Returns (delegate calls, {op: count} of the ops the runtime's kernels run)."""
    from executorch.runtime import Runtime

    have = set(Runtime.get().operator_registry.operator_names)
    delegates, ops = 0, {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if "call_delegate" in str(node.target):
            delegates += 1
            continue
        name = _runtime_op_name(node.target)
        if name is None:
            continue
        ops[name] = ops.get(name, 0) + 1
        if name not in have and not name.startswith("executorch_prim::"):
            raise LowbitError(
                f"node {node.name} ({name}) in layer {_layer_of(node)}: the ExecuTorch runtime has no kernel for "
                f"this op and XNNPACK did not take it; replace the op in the model, keep the layer out of the "
                f"export, or build the runtime with a kernel for it")
    return delegates, ops


# XNNPACK partitions made of these ops only are left to the runtime's portable kernels, which compute the same
# numbers (copies and float adds are exact either way). With dynamic batch and sequence sizes, the reshapes
# XNNPACK cannot take (two dynamic dimensions: a transformer's attention heads) cut the graph into many such
# partitions, a permute or a residual add each, and every partition costs ExecuTorch ~0.5 s of lowering (17
# XNNPACK passes, each re-tracing it) for next to no work at run time.
LIGHT_OPS = frozenset({"permute_copy", "view_copy", "_clone_dim_order", "clone", "add"})


def _op_base_name(target) -> str:
    """'permute_copy' for aten::permute_copy (edge and ATen ops); str(target) for anything else."""
    schema = getattr(target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else str(target)


def _partitioner():
    """XNNPACK's partitioner, leaving partitions of LIGHT_OPS only to the portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class Partitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            result = super().partition(exported_program)
            members: dict[str, list[torch.fx.Node]] = {}
            for node in exported_program.graph_module.graph.nodes:
                tag = node.meta.get("delegation_tag")
                if tag in result.partition_tags:
                    members.setdefault(tag, []).append(node)
            for tag, nodes in members.items():
                ops = [n for n in nodes if n.op == "call_function"]
                if ops and all(_op_base_name(n.target) in LIGHT_OPS for n in ops):
                    for n in nodes:
                        del n.meta["delegation_tag"]
                    del result.partition_tags[tag]
            return result

    return Partitioner()


def _lower(ep: torch.export.ExportedProgram):
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    config = EdgeCompileConfig(_core_aten_ops_exception_list=list(EXTRA_EDGE_OPS))
    try:
        return to_edge_transform_and_lower(ep, partitioner=[_partitioner()], compile_config=config) \
            .to_executorch()
    except Exception as e:
        raise LowbitError(f"ExecuTorch could not lower the exported program: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- verification


def run_pte(program, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run the forward method of a .pte (a path or the file's bytes) in executorch.runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(program).load_method("forward")
    return [o for o in method.execute(list(inputs)) if isinstance(o, torch.Tensor)]


def max_rel_error(ys: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """max over outputs of max|y − r| / max|r| (inf on a shape mismatch or an integer output that differs)."""
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


def _check_close(ys, refs, atol: float, rtol: float, what: str) -> None:
    if len(ys) != len(refs):
        raise LowbitError(f"the program returned {len(ys)} outputs, {what} {len(refs)}")
    for i, (y, r) in enumerate(zip(ys, refs)):
        if tuple(y.shape) != tuple(r.shape):
            raise LowbitError(f"output {i} has shape {tuple(y.shape)} in ExecuTorch, {tuple(r.shape)} in {what}")
        if not r.is_floating_point():
            if not torch.equal(y, r):
                raise LowbitError(f"integer output {i} differs between ExecuTorch and {what}")
            continue
        if not r.numel():
            continue
        diff, scale = float((y.to(r.dtype) - r).abs().max()), float(r.abs().max())
        if not diff <= atol + rtol * scale:  # `not <=` also catches NaN
            raise LowbitError(f"output {i} of the ExecuTorch program differs from {what} by {diff:.3g}, more than "
                              f"atol {atol:g} + rtol {rtol:g} × max|ref| {scale:.3g}")


def _excess(ys, refs, atol: float, rtol: float) -> float:
    """max over outputs of max|y − r| / (atol + rtol·max|r|): at most 1 where `_check_close` passes."""
    if len(ys) != len(refs) or any(tuple(y.shape) != tuple(r.shape) for y, r in zip(ys, refs)):
        return math.inf
    out = 0.0
    for y, r in zip(ys, refs):
        if not r.is_floating_point():
            out = max(out, 0.0 if torch.equal(y, r) else math.inf)
        elif r.numel():
            diff, bound = float((y.to(r.dtype) - r).abs().max()), atol + rtol * float(r.abs().max())
            if diff != diff or (diff and not bound):  # NaN, or any difference at zero tolerance
                return math.inf
            out = max(out, diff / bound if diff else 0.0)
    return out


def _verify(result: PteExport, data: bytes, inputs, refs, sims, atol, rtol, reference=None) -> None:
    """Compare the program's outputs on `inputs` with `refs`; `reference` = (model, run) re-runs the PyTorch
    quantized model, to explain a W4A4 mismatch by rounding flips."""
    ys = run_pte(data, inputs)
    result.error = max_rel_error(ys, refs)
    int8_acts = sims is not None
    result.atol = ATOL if atol is None else atol
    result.rtol = max((ROUTE_RTOL[r] for r in result.routes.values()), default=RTOL_FLOAT) if rtol is None else rtol
    if int8_acts:  # a diagnostic: rounding flips of single int8 activations keep this near `error`
        result.error_vs_simulated = max_rel_error(ys, sims)
    sim = ("" if result.error_vs_simulated is None else
           f"; relative error against the int8-simulated model {result.error_vs_simulated:.3g}")
    hint = (f" (routes: {sorted(set(result.routes.values()))}{sim}; nothing was written to {result.path}; "
            f"export with int4='packed' to tell an XNNPACK kernel problem from a decomposition problem, or "
            f"verify=False to write the file anyway)")
    try:
        _check_close(ys, refs, result.atol, result.rtol, "the PyTorch quantized model")
    except LowbitError as e:
        flips = None
        if reference is not None and "fp4-a4" in result.routes.values():
            flips = explain_by_flips(*reference, ys, lambda a, b: _excess(a, b, result.atol, result.rtol), 1.0)
            hint = (f"{hint[:-1]}; W4A4 layers: rounding up to {MAX_FLIPS} of the activations nearest to an FP4 "
                    f"rounding midpoint the other way does not explain the difference, so it is more than rounding "
                    f"flips unless farther or more activations flipped)")
        if flips is None:
            raise LowbitError(f"{e}{hint}") from None
        result.rounding_flips = [f.describe() for f in flips]


# ----------------------------------------------------------------------------- the exporter


@known_warnings
def export_pte(model: torch.nn.Module, records, example_inputs, path, *, dynamic_shapes="auto",
               max_batch: int = DEFAULT_MAX_BATCH, max_seq: int | None = None, int4: str = "xnnpack",
               strict: bool = False, verify: bool = True, atol: float | None = None,
               rtol: float | None = None) -> PteExport:
    """Export `model` with its linears quantized by `records` (a {FQN: QuantizedLinear | FP4QuantizedLinear}
    mapping or a Checkpoint) to an ExecuTorch program at `path`.

    example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs (tensors).
    dynamic_shapes: "auto" (dimension 0 ≤ max_batch and dimension 1 ≤ max_seq of every input tensor are
        dynamic where the model allows, static where not; max_seq defaults to min(256, the model's
        max_position_embeddings)), None (static: the example shapes), or a torch.export dynamic_shapes spec.
        With "auto", an example of batch (or sequence) size 1 is traced repeated to size 2 (torch.export would
        fix a size-1 dimension to 1); the program runs any size from 1 to the maximum. With None or an explicit
        spec a size-1 dimension stays fixed: give an example of batch ≥ 2 to run other batch sizes.
    int4: "xnnpack" runs 4-bit layers whose blocks are 32·k inputs on XNNPACK's int8-activation × int4
        kernel; "packed" runs every layer on the exact unpack + float matmul route.
    verify: run the program in executorch.runtime on the example inputs before writing it; raise LowbitError
        (and write nothing) when an output differs from the PyTorch quantized model by more than
        atol + rtol·max|ref| (defaults and their reasons: the module docstring), unless the program has W4A4 FP4
        layers and a few activations rounded the other way at an FP4 rounding midpoint explain the difference
        (then listed in the result's `rounding_flips`).
    """
    records = records_of(records)
    args, kwargs = split_inputs(example_inputs)
    path = Path(path)
    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if bad:
        raise LowbitError(f"export_pte expects a float32 model (XNNPACK's int4 kernel takes float32 activations); "
                          f"found parameters in {bad}: call model.float() first")
    try:
        import executorch.runtime  # noqa: F401
    except ModuleNotFoundError as e:
        raise LowbitError(f"ExecuTorch export needs {e.name!r}: pip install 'lowbit-compile[edge]'") from e

    qmodel = swap_linears(model, records).eval()  # a deep copy: the user's model is left alone
    config = getattr(qmodel, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache object is neither exportable nor a tensor output
    rt_model = copy.deepcopy(qmodel)
    routes = decompose_lowbit_linears(rt_model, int4)

    trace_args, trace_kwargs = args, kwargs
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise LowbitError(f"dynamic_shapes={dynamic_shapes!r}: use 'auto', None or a torch.export spec")
        max_seq = max_seq or _default_max_seq(model)
        dims = [d for d, top in ((0, max_batch), (1, max_seq)) if top >= 2]
        trace_args, trace_kwargs, _ = widen_size_one_dims(qmodel, args, kwargs, dims)
        dynamic_shapes = _auto_dynamic_shapes(qmodel, trace_args, trace_kwargs, max_batch, max_seq)
    ep = _capture(rt_model, trace_args, trace_kwargs, dynamic_shapes, strict)
    _check_no_lowbit_ops(ep)
    program = _lower(ep)
    delegates, ops = _check_runtime_kernels(program.exported_program())
    data = program.buffer

    result = PteExport(path=path, nbytes=len(data), routes=routes,
                       quantized_weights=sum(r.in_features * r.out_features for r in records.values()),
                       dynamic_dims=_dynamic_dims(ep), delegates=delegates, portable_ops=ops)
    if verify:
        with torch.no_grad():
            refs = tensor_leaves(qmodel(*args, **kwargs))
            int8_acts = "xnnpack-int4" in routes.values()
            sims = tensor_leaves(rt_model(*args, **kwargs)) if int8_acts else None
        _verify(result, data, _flat_inputs(ep, args, kwargs), refs, sims, atol, rtol,
                reference=(qmodel, lambda: tensor_leaves(qmodel(*args, **kwargs))))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)  # an interrupted export leaves the previous file intact
    return result
