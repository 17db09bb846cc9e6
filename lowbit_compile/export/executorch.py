"""Export a quantized model to an ExecuTorch `.pte` that stores the low-bit weights and runs in the runtime.

    swap_linears (records → LowbitLinear): the PyTorch quantized model, the reference
      └─ decompose_lowbit_linears (decompose.py): the same layers in ops the runtime has
           └─ torch.export (dynamic batch / sequence) ─▶ check: no lowbit:: op left
                └─ to_edge_transform_and_lower + XNNPACK ─▶ to_executorch
                     └─ check: every op outside XNNPACK has a kernel in the runtime
                          └─ verify: run the program in executorch.runtime, compare ─▶ write the .pte

Route xnnpack-int4-load (int4="xnnpack-load": 2/3-bit layers on XNNPACK's int4 kernel, 2/3 bits in the file) adds
a second method to the program, `lowbit_weights` (decompose.LoadTimeWeights: the packed codes in, XNNPACK's int4
weight bytes and bfloat16 scales out), and lowers forward with those weights tagged as external named data, so
XNNPACK's serializer leaves them out of the .pte. The export checks that the method's bytes are exactly the ones
left out, under the keys XNNPACK gave them (sha256 of the bytes, "scale_" + sha256 for scales). `load_pte_method`
runs the method once, writes its outputs as a .ptd under those keys and loads forward with it; XNNPACK packs them
at load like weights from the file, so forward runs as fast as a 4-bit program. A plain
`Runtime.load_program(path).load_method("forward")` fails on such a file (a missing named-data key): it needs
that loader or its C++ equivalent (execute `lowbit_weights`, wrap the outputs in a NamedDataMap).

The same route stores a tied table once. A head tied to a quantized embedding shares its record: the embedding's
gather (portable ops) reads the packed table from the program's constants, and XNNPACK, left to itself, stores its
own int4 copy of the same codes for the head (a delegate's weights cannot be read by the ops outside it: SmolLM2's
49 152 × 576 table, 16 MB, twice). With int4="xnnpack-load" such a head takes route xnnpack-int4-load: its XNNPACK
weight is left out of the file and `lowbit_weights` rebuilds it from the table (4-bit codes are already XNNPACK's
nibbles: a copy; the float16 scales rounded to bfloat16). The method's inputs are the very bytes of the gather's
constants, and ExecuTorch's emitter keeps one copy of equal constants across the methods of a program, so the file
holds the table once, and the head runs XNNPACK's int4 kernel on the same bytes as before (the outputs equal the
int4="xnnpack" program's bit for bit). The alternative that loads in a plain runtime, the head decoded from the
table in the graph on every forward (route packed), is two orders of magnitude slower: SmolLM2's head alone, one
token, one thread, 195 ms against 1.9 ms on XNNPACK's kernel.

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
- xnnpack-int4-load: the same kernel and the same two roundings as xnnpack-int4 (int8 activations per token,
  bfloat16 block scales); the 2/3-bit codes become int4 codes exactly (2c − (2^b − 1) at half the scale, and
  halving commutes with the bfloat16 rounding), so RTOL_INT8_ACTIVATIONS holds for the same reasons. We measure
  1–2 % (tiny Llama at 2/3 bits, MiniLM's first layer, a 512-wide MLP; 2.1 % on the 2-layer benchmark Llama) and
  6e-4–1e-3 against the int8-simulated model. The widening itself is checked bit for bit at export.
- E8 (decompose.E8PackedLinear, route e8-packed): the codes decode exactly to the reference's float weight, so a
  float-rounding route (RTOL_FLOAT; measured ≤ 1e-6 on MLPs at 2/3/4 bits and the 1-layer tiny Llama, 3.1e-6 on
  all-MiniLM-L6-v2 w2-e8). E8 on XNNPACK (E8Int4Linear, e8-xnnpack-int4[-load]): int8 activations as on the int4
  route (RTOL_INT8_ACTIVATIONS); the rank-one zero-point term is float. Measured 0.5–1 % on small MLPs, ~2e-7
  against the int8-simulated model.
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
from .decompose import LoadTimeWeights, decompose_lowbit_linears, load_time_weights
from .fp4_flips import MAX_FLIPS, explain_by_flips
from .inputs import (
    ExportResult,
    dynamic_shapes_for,
    is_symbolic,
    max_abs_error,
    max_rel_error,
    quantized_weights,
    records_of,
    split_inputs,
    tensor_leaves,
    widen_size_one_dims,
)

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
ROUTE_RTOL = {"gather": RTOL_FLOAT, "packed": RTOL_FLOAT, "e8-packed": RTOL_FLOAT, "fp4-a16": RTOL_FLOAT,
              "fp4-a4": RTOL_FLOAT, "xnnpack-int4": RTOL_INT8_ACTIVATIONS, "xnnpack-int4-load": RTOL_INT8_ACTIVATIONS,
              "e8-xnnpack-int4": RTOL_INT8_ACTIVATIONS, "e8-xnnpack-int4-load": RTOL_INT8_ACTIVATIONS}
INT8_ACTIVATION_ROUTES = ("xnnpack-int4", "xnnpack-int4-load", "e8-xnnpack-int4", "e8-xnnpack-int4-load")

# Route xnnpack-int4-load: the method that rebuilds the int4 weights (decompose.LoadTimeWeights), and the tag of
# the named data it replaces (left out of the .pte; load_pte_method supplies it).
WEIGHTS_METHOD = "lowbit_weights"
WEIGHTS_TAG = "lowbit_weights"

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ = 256


@dataclass
class PteExport(ExportResult):
    """ExportResult for a .pte: routes are "xnnpack-int4" | "xnnpack-int4-load" | "packed" | "fp4-a16" | "fp4-a4" |
    "e8-packed" | "e8-xnnpack-int4" | "e8-xnnpack-int4-load" | "gather" (embeddings); plus what only an ExecuTorch
    program has."""

    delegates: int = 0  # XNNPACK subgraphs called by the program
    portable_ops: dict[str, int] = field(default_factory=dict)  # ops run by the runtime's own kernels: count
    error_vs_simulated: float | None = None  # `error` against the int8-activation simulated model
    # W4A4 FP4: activations the program rounded the other way at an FP4 rounding midpoint (fp4_flips.py), when
    # they explain a mismatch; `error` is still measured against the reference without them
    rounding_flips: list[str] = field(default_factory=list)
    # xnnpack-int4-load layers: the method that rebuilds their weights when the program is loaded (load_pte_method
    # runs it; a plain load_method("forward") fails for want of that data), and its ops on the portable kernels
    weights_method: str | None = None
    weights_method_ops: dict[str, int] = field(default_factory=dict)


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
                f"lowering for this op (it decomposes the lowbit linears made from QuantizedLinear, "
                f"E8QuantizedLinear and FP4QuantizedLinear records, not lowbit ops called directly); keep that layer "
                f"in float for export, or run it through torch.compile(backend='lowbit')")


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


def _tag_load_time_weights(codes: list[torch.Tensor]):
    """An ExecuTorch pass that marks forward's constants holding these int4 codes (the xnnpack-int4-load layers'
    weights) as external named data: XNNPACK's serializer then leaves their bytes, and those of their scales, out of
    the .pte. Matched by value, so names and the order of inputs do not matter."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from torch.export.graph_signature import InputKind

    class TagLoadTimeWeights(ExportedProgramPassBase):
        def call(self, ep):
            nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
            found = set()
            for spec in ep.graph_signature.input_specs:
                if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    continue
                t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
                if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
                    continue
                hits = [i for i, c in enumerate(codes) if c.shape == t.shape and torch.equal(c, t)]
                if hits:
                    nodes[spec.arg.name].meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG
                    found.update(hits)
            if len(found) != len(codes):
                raise LowbitError(f"{len(codes) - len(found)} of the {len(codes)} xnnpack-int4-load weights are not "
                                  f"constants of the edge program; export with int4='xnnpack-wide' or 'packed'")
            return ExportedProgramPassResult(ep, True)

    return TagLoadTimeWeights()


def _lower(ep: torch.export.ExportedProgram, weights: tuple[torch.export.ExportedProgram, LoadTimeWeights] | None
           = None):
    """forward (XNNPACK partitions, portable kernels for the rest) and, for xnnpack-int4-load layers, the
    WEIGHTS_METHOD program (portable kernels only), lowered to one ExecuTorch program."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    config = EdgeCompileConfig(_core_aten_ops_exception_list=list(EXTRA_EDGE_OPS))
    programs, passes, partitioner = ep, None, [_partitioner()]
    if weights is not None:
        programs = {"forward": ep, WEIGHTS_METHOD: weights[0]}
        passes = {"forward": [_tag_load_time_weights(weights[1].int4_codes)]}
        partitioner = {"forward": partitioner}
    try:
        return to_edge_transform_and_lower(programs, transform_passes=passes, partitioner=partitioner,
                                           compile_config=config).to_executorch()
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"ExecuTorch could not lower the exported program: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- weights widened at load


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def weights_data(outputs: Sequence[torch.Tensor]) -> dict[str, bytes]:
    """The named data forward's XNNPACK delegate reads, from the outputs of WEIGHTS_METHOD: each under the key
    ExecuTorch 1.5's XNNPACK serializer gives it, the sha256 of its bytes ("scale_" + sha256 for the block or
    channel scales). export_pte checks these keys and bytes against what the serializer left out of the file."""
    import hashlib

    data = {}
    for i, t in enumerate(outputs):  # (codes, scales) per layer
        b = _tensor_bytes(t)
        data[("scale_" if i % 2 else "") + hashlib.sha256(b).hexdigest()] = b
    return data


def _ptd(data: dict[str, bytes]) -> bytes:
    """A .ptd (FlatTensor) file holding `data` as named blobs."""
    from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    entries = {k: DataEntry(i, 16, None) for i, k in enumerate(data)}
    return bytes(FlatTensorSerializer().serialize(DataPayload(buffers=list(data.values()), named_data=entries)))


def _external_data(program) -> dict[str, bytes]:
    """The named data the lowering left out of the .pte (tag WEIGHTS_TAG): {key: bytes}."""
    import tempfile

    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    with tempfile.TemporaryDirectory() as tmp:
        program.write_tensor_data_to_file(tmp)
        path = Path(tmp) / f"{WEIGHTS_TAG}.ptd"
        if not path.exists():
            return {}
        payload = FlatTensorSerializer().deserialize(Cord(path.read_bytes()))
    return {k: bytes(payload.buffers[e.buffer_index]) for k, e in payload.named_data.items()}


def _check_load_time_weights(program, weights: LoadTimeWeights) -> None:
    """What WEIGHTS_METHOD computes (here in PyTorch, the same ops) must be exactly the data the lowering left out
    of the file, under the same keys; the runtime's own run of the method is checked by `_verify`."""
    with torch.no_grad():
        ours = weights_data(weights())
    theirs = _external_data(program)
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))
        differ = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k])
        raise LowbitError(
            f"the weights rebuilt at load for layers {[fqn for fqn, _, _ in weights.layers]} do not match the data "
            f"XNNPACK's serializer left out of the file ({len(missing)} keys missing, {len(differ)} differ, "
            f"{len(set(ours) - set(theirs))} unexpected): this ExecuTorch version stores or names int4 weights "
            f"differently; export with int4='xnnpack-wide' (4 bits in the file) or 'packed'")


def load_pte_method(program, name: str = "forward"):
    """An executorch.runtime Method of a .pte (a path or the file's bytes), ready to execute.

    A program with xnnpack-int4-load layers (it has a WEIGHTS_METHOD) runs that method once first and hands its
    outputs, under the keys of `weights_data`, to the program as its external data (a .ptd in a temporary folder,
    alive as long as the Method): XNNPACK then packs them at load like weights stored in the file. A C++ loader
    does the same: execute WEIGHTS_METHOD, put the outputs into a NamedDataMap, load forward with it."""
    import tempfile
    import weakref

    from executorch.runtime import Runtime

    runtime = Runtime.get()
    if isinstance(program, Path):
        program = str(program)
    loaded = runtime.load_program(program)
    if WEIGHTS_METHOD not in loaded.method_names:
        return loaded.load_method(name)
    data = _ptd(weights_data(loaded.load_method(WEIGHTS_METHOD).execute([])))
    del loaded  # the weights method's memory
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-pte-")
    ptd = Path(tmp.name) / f"{WEIGHTS_TAG}.ptd"
    ptd.write_bytes(data)
    try:
        method = runtime.load_program(program, data_path=ptd).load_method(name)
    except RuntimeError as e:
        tmp.cleanup()
        raise LowbitError(f"method {name!r} did not load with the weights {WEIGHTS_METHOD!r} rebuilt ({e}; the "
                          f"runtime's log names a missing key): the method computed other bytes than at export, "
                          f"or this runtime's XNNPACK names its data differently from the exporter's") from e
    weakref.finalize(method, tmp.cleanup)
    return method


# ----------------------------------------------------------------------------- verification


def run_pte(program, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run the forward method of a .pte (a path or the file's bytes) in executorch.runtime (load_pte_method)."""
    method = load_pte_method(program)
    return [o for o in method.execute(list(inputs)) if isinstance(o, torch.Tensor)]


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
    result.error, result.max_abs_error = max_rel_error(ys, refs), max_abs_error(ys, refs)
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
    int4: which integer layers run on XNNPACK's int8-activation × int4 kernel (blocks of 32·k inputs; the
        others are packed) and where 2/3-bit codes are widened to its 4 bits (decompose.route_for):
        "xnnpack": 4-bit layers; 2/3-bit layers stay packed, unpacked in the graph on every forward (the file keeps
            their size and runs in a plain runtime, several times slower than float32);
        "xnnpack-load": 2/3-bit layers too, widened when the program is loaded (route xnnpack-int4-load: the file
            keeps 2/3 bits and runs as fast as 4-bit layers, but needs `load_pte_method` or its C++ equivalent:
            a plain `Runtime.load_program(path).load_method("forward")` fails for want of the widened weights),
            and a head tied to a quantized embedding, its XNNPACK weight rebuilt at load from the embedding's
            table (the file holds the table once instead of twice);
        "xnnpack-wide": 2/3-bit layers too, widened in the file (4 bits per weight on disk, a plain runtime);
        "packed": every layer on the exact unpack + float matmul route.
        E8 layers (E8QuantizedLinear) are decoded in the graph (route e8-packed) with "xnnpack" and "packed", and
        run XNNPACK's int4 kernel with "xnnpack-load" (their int4 digits rebuilt at load from the E8 codes: route
        e8-xnnpack-int4-load) and "xnnpack-wide" (digits in the file, 4 bits per weight and E8 stage).
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
    widen = load_time_weights(rt_model)
    program = _lower(ep, None if widen is None else (_capture(widen, (), {}, None, strict), widen))
    delegates, ops = _check_runtime_kernels(program.exported_program())
    data = program.buffer

    result = PteExport(path=path, nbytes=len(data), routes=routes,
                       quantized_weights=quantized_weights(records),
                       dynamic_dims=_dynamic_dims(ep), delegates=delegates, portable_ops=ops)
    if widen is not None:
        _check_load_time_weights(program, widen)
        result.weights_method = WEIGHTS_METHOD
        _, result.weights_method_ops = _check_runtime_kernels(program.exported_program(WEIGHTS_METHOD))
    if verify:
        with torch.no_grad():
            refs = tensor_leaves(qmodel(*args, **kwargs))
            int8_acts = any(r in INT8_ACTIVATION_ROUTES for r in routes.values())
            sims = tensor_leaves(rt_model(*args, **kwargs)) if int8_acts else None
        _verify(result, data, _flat_inputs(ep, args, kwargs), refs, sims, atol, rtol,
                reference=(qmodel, lambda: tensor_leaves(qmodel(*args, **kwargs))))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)  # an interrupted export leaves the previous file intact
    return result
