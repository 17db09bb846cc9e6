"""Export quantized models to ONNX files that onnxruntime runs with its low-bit kernels.

`export_onnx(model, records, example_inputs, path)` swaps every quantized nn.Linear for an `OnnxLowbitLinear` /
`OnnxFP4Linear` and exports with `torch.onnx.export(dynamo=True)` (dynamic batch and sequence axes, opset 21–26).
Each module is a few `lowbit_onnx::` nodes (onnx_ops.py) whose translation functions write the ONNX subgraph:

- Integer weights, default routes (the fastest on onnxruntime's CPU kernels that keep the file at the recipe's
  size; `bench/onnx_latency.py` has the numbers): 4 bits go to `com.microsoft::MatMulNBits` (exact float32
  activations without accuracy_level) on the record's packed bytes (packing along K, element 0 in the low bits
  is MatMulNBits' layout; K padded to whole blocks with the zero code; our zero point 2^(bits−1) is its
  default). 2 and 3 bits keep their packed bytes in the file; the graph unpacks them with BitShift/BitwiseAnd
  and widens every code exactly to a 4-bit code at half the scale (midrise grids: (c − (2^b − 1)/2)·s =
  (2c + 1 − 2^b)·s/2), which onnxruntime constant-folds into a 4-bit MatMulNBits weight when the session is
  created: the 4-bit kernel's speed, 4 bits per weight in memory, 2/3 in the file. 8 bits are dequantized by
  nodes onnxruntime folds into a float weight at load (its 8-bit kernel is ~30× slower than float at batch 1).
  `native_nbits=True` uses MatMulNBits' own 2- and 8-bit kernels instead (memory 2/8 bits, much slower).
- `standard_ops=True`: only standard ONNX ops (no com.microsoft domain), for runtimes without contrib ops:
  blocked DequantizeLinear on an INT4 initializer (4 bits; int8 for 8 bits; 2/3 bits unpacked and widened in
  the graph, then Cast to INT4) + MatMul. onnxruntime fuses this QDQ pattern into MatMulNBits itself.
- FP4 (LLM-FP4): codes decoded through a 16-entry Gather table (onnxruntime has no FP4 DequantizeLinear on CPU),
  folded at load to a float weight. W4A4 records quantize the activations per tensor to the FP4 grid in the
  graph (after the per-channel 2**k shift, bit-exact with `formats.fp4.quantize`); W4A16 records fold 2**k into
  the weight's columns.
- E8 lattice codes (E8QuantizedLinear, w2/w3/w4-e8 and -ft): the record's code bytes (2, 3 or 4 per 8 weights) and
  float16 row scales, plus 4.3 KB of int8 digit tables once per file (formats.e8p.digit_tables). The graph turns each
  code into 4-bit digits d = 2C + 7.5 (Gathers by the code's two bytes, a Mul, an Add) and packs them as a 4-bit
  MatMulNBits weight with a float zero point 7.5 (exact on onnxruntime's CPU kernel), one MatMulNBits per E8 stage
  (3 and 4 bits: two, summed, scales m·s with e8p.DIGIT_MULTIPLIERS). The decode reads initializers only and
  onnxruntime folds it at session creation (verified: the optimized graph has no Gather left and every B is an
  initializer). standard_ops: the digits become a float weight (folded at load) and a MatMul. Fine-tuned (-ft)
  sign vectors hold float16 values and are stored as float16.
- Randomized Hadamard transforms (`su`, `sv`, fp4-rot's `su`): one small MatMul per axis of the input reshaped to
  (..., Kf, P1, P2) (Sylvester H_P1, H_P2 built in the graph, the Kf×Kf factor stored once per size as int8 ±1),
  sign vectors one bit each.

Scales stay float16 in the file (widened and expanded to blocks by nodes onnxruntime folds), so the file holds
the checkpoint's bits per weight plus the graph. It is written with `optimize=False` (the exporter's optimizer
could constant-fold packed weights back to float); per-node debug metadata is stripped.

Running the result: for the standard-ops file, onnxruntime's fusion of DequantizeLinear→MatMul into MatMulNBits
quantizes the activations to int8 (accuracy_level 4) unless the session says otherwise. To run exactly (float32
activations), set the session option that `exact_session_options()` sets:

    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")

`verify=True` (the default) runs onnxruntime (CPUExecutionProvider, that option set) on the example inputs and
raises LowbitError when the outputs differ from the PyTorch quantized model (`nn.swap_linears`) beyond float32
rounding. The file (and its external data) is written atomically (`io.atomic_outputs`), and not at all when the
export or the verification fails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import formats, hadamard
from ..checkpoint import FP4QuantizedLinear, QuantizedLinear
from ..errors import LowbitError
from ..formats import e8p
from ..io import atomic_outputs
from ..quiet import known_warnings
from . import onnx_ops
from .embedding import GatherEmbedding
from .inputs import (
    ExportResult,
    dynamic_shapes_for,
    max_abs_error,
    max_rel_error,
    quantized_weights,
    records_of,
    split_inputs,
    tensor_leaves,
    widen_size_one_dims,
)
from .onnx_ops import compact_factor, pack_signs, pad_codes

BLOCK_SIZES = (128, 64, 32, 16)
OPSET = 21
OPSETS = range(21, 27)
# Verification tolerance: |onnx − torch| ≤ RTOL·max|torch| + ATOL. Both sides compute in float32 with
# different summation orders (MatMulNBits blocks, Kronecker vs. butterfly Hadamard); a wrong code, scale,
# zero point or transform gives errors of the order of the outputs themselves.
RTOL = 2e-3
ATOL = 1e-4
ROUTE_NAMES = {"nbits": "MatMulNBits", "nbits2": "MatMulNBits 2-bit + zero-point correction",
               "fold": "int8 dequantized at load + MatMul", "dq": "DequantizeLinear+MatMul"}


def choose_block(k: int, group_size: int) -> int:
    """Quantization block: must divide the scale group; prefer no padding of K, then the larger block."""
    g = k if group_size == 0 else group_size
    cands = [b for b in BLOCK_SIZES if g % b == 0]
    if not cands:  # a group that no block divides (only possible for per-row scales, g = K)
        if group_size:
            raise LowbitError(f"group size {group_size}: MatMulNBits needs a block of 16..256 dividing the group; "
                              f"use group sizes that are multiples of 16")
        cands = list(BLOCK_SIZES)
    return min(cands, key=lambda b: (-(-k // b) * b, -b))


class _Factors(dict):
    """Compact Hadamard factors by (size, transposed): one tensor, hence one initializer, per size."""

    def get_factor(self, n: int, transposed: bool = False) -> torch.Tensor | None:
        if (n, transposed) not in self:
            f = hadamard.factor(n)
            self[n, transposed] = compact_factor(None if f is None else (f.t().contiguous() if transposed else f))
        return self[n, transposed]


class OnnxLowbitLinear(torch.nn.Module):
    """One integer quantized linear in its ONNX form: rotate → int_matmul → rotate back (+ bias)."""

    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None, route: str = "nbits",
                 factors: _Factors | None = None):
        super().__init__()
        factors = _Factors() if factors is None else factors
        if route not in onnx_ops.ROUTES or (route == "nbits2" and rec.bits != 2) or (route == "fold" and rec.bits != 8):
            raise LowbitError(f"layer {rec.fqn}: route {route!r} does not apply to int{rec.bits}; valid: "
                              f"nbits, dq, nbits2 (2-bit only), fold (8-bit only)")
        self.fqn, self.bits, self.route = rec.fqn, rec.bits, route
        self.k, self.n, self.group_size = rec.in_features, rec.out_features, rec.group_size
        self.block = choose_block(self.k, self.group_size)
        codes = formats.unpack(rec.qweight, rec.bits, self.k)
        if route == "dq" and rec.bits == 4:  # int4 (code − 8) in (K, N) order: retyped INT4 after export
            qw = formats.pack((codes ^ 8).t().reshape(1, -1).contiguous(), 4).reshape(-1)
        elif route == "dq" and rec.bits == 8:
            qw = (codes ^ 0x80).t().contiguous().view(torch.int8)
        elif route == "fold":  # int8 code − 128, (N, K)
            qw = (codes ^ 0x80).view(torch.int8)
        elif rec.bits in (4, 8) or route == "nbits2":  # MatMulNBits' B: (N, blocks, block bytes)
            kp = -(-self.k // self.block) * self.block
            zero = 1 << (rec.bits - 1)
            qw = formats.pack(pad_codes(codes, kp, zero), rec.bits).reshape(self.n, kp // self.block, -1)
        else:  # 2/3 bits: the record's bytes, unpacked and widened in the graph
            qw = rec.qweight.detach().reshape(onnx_ops.unpack_shape(rec.bits, self.n, self.k))
        self.register_buffer("qweight", qw.contiguous().clone())
        self.register_buffer("scales", rec.scales.detach().to(torch.float16).clone())
        self.register_buffer("su", None if rec.su is None else pack_signs(rec.su))
        self.register_buffer("sv", None if rec.sv is None else pack_signs(rec.sv))
        self.register_buffer("had_in", factors.get_factor(self.k) if rec.su is not None else None)
        self.register_buffer("had_out", factors.get_factor(self.n, transposed=True) if rec.sv is not None else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @property
    def route_name(self) -> str:
        if self.route == "nbits" and self.bits in (2, 3):
            return f"MatMulNBits (int{self.bits} widened to 4 bits in the graph)"
        return ROUTE_NAMES[self.route]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.su is not None:
            h = torch.ops.lowbit_onnx.rotate(h, self.su, self.had_in, None)
        y = torch.ops.lowbit_onnx.int_matmul(h, self.qweight, self.scales, self.bits, self.k, self.n,
                                             self.group_size, self.block, self.route)
        if self.sv is not None:
            y = torch.ops.lowbit_onnx.rotate(y, None, self.had_out, self.sv)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class _E8Tables(dict):
    """`e8p.digit_tables()` as one set of tensors per export, hence one initializer each for every E8 layer."""

    def get_tables(self) -> e8p.DigitTables:
        if "tables" not in self:
            t = e8p.digit_tables()
            self["tables"] = e8p.DigitTables(*(v.clone() for v in (t.magnitudes, t.signs, t.offsets, t.ball)))
        return self["tables"]


class OnnxE8Linear(torch.nn.Module):
    """One E8 lattice-code linear (E8QuantizedLinear) in its ONNX form: rotate → e8_matmul → rotate back (+ bias).

    The file holds the record's code bytes (2, 3 or 4 per 8 weights), its float16 row scales, the sign vectors
    (one bit each; float16 where fine-tuning made them real-valued, exact: finetune stores float16 values) and the
    4.3 KB digit tables once per file. Route "nbits": the graph decodes each code into 4-bit digits (two Gathers,
    a Mul and an Add per E8P stage: e8p.digit_tables) and packs them as MatMulNBits' B with zero point 7.5 (a float
    zero point per block, which onnxruntime's CPU kernel applies exactly): one 4-bit MatMulNBits per stage (two
    for 3 and 4 bits, summed). Everything but the MatMulNBits reads initializers only, so onnxruntime folds it when
    the session is created: 4 bits per weight and stage in memory, the record's bits in the file. Route "fold"
    (standard_ops): the digits become a float weight (folded at load) and a MatMul: standard ops, 32 bits in
    memory."""

    def __init__(self, rec, bias: torch.Tensor | None, route: str = "nbits", factors: _Factors | None = None,
                 tables: _E8Tables | None = None):
        super().__init__()
        factors = _Factors() if factors is None else factors
        tables = (_E8Tables() if tables is None else tables).get_tables()
        if route not in onnx_ops.E8_ROUTES:
            raise LowbitError(f"layer {rec.fqn}: route {route!r} for an E8 record; valid: {onnx_ops.E8_ROUTES}")
        if rec.in_features % e8p.DIM:
            raise LowbitError(f"layer {rec.fqn}: an E8 record with in_features={rec.in_features}, not a multiple "
                              f"of {e8p.DIM}; the record is damaged: re-quantize the layer")
        self.fqn, self.bits, self.route = rec.fqn, rec.bits, route
        self.k, self.n = rec.in_features, rec.out_features
        self.block = choose_block(self.k, 0)
        fmt = e8p.e8_format(rec.bits)
        self.register_buffer("qweight", rec.qweight.detach().reshape(self.n, -1, fmt.bytes_per_group).clone())
        self.register_buffer("scales", rec.scales.detach().to(torch.float16).reshape(self.n, 1).clone())
        self.register_buffer("su", None if rec.su is None else pack_signs(rec.su))
        self.register_buffer("sv", None if rec.sv is None else pack_signs(rec.sv))
        self.register_buffer("had_in", factors.get_factor(self.k) if rec.su is not None else None)
        self.register_buffer("had_out", factors.get_factor(self.n, transposed=True) if rec.sv is not None else None)
        self.register_buffer("magnitudes", tables.magnitudes)
        self.register_buffer("signs", tables.signs)
        self.register_buffer("offsets", tables.offsets)
        self.register_buffer("ball", tables.ball if rec.bits == 3 else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @property
    def route_name(self) -> str:
        stages = e8p.e8_format(self.bits).stages
        if self.route == "fold":
            return f"E8 e8p{self.bits} decoded at load + MatMul"
        return f"MatMulNBits (E8 e8p{self.bits} as 4-bit digits{', 2 stages' if stages == 2 else ''})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.su is not None:
            h = torch.ops.lowbit_onnx.rotate(h, self.su, self.had_in, None)
        y = torch.ops.lowbit_onnx.e8_matmul(h, self.qweight, self.scales, self.magnitudes, self.signs, self.offsets,
                                            self.ball, self.bits, self.k, self.n, self.block, self.route)
        if self.sv is not None:
            y = torch.ops.lowbit_onnx.rotate(y, None, self.had_out, self.sv)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class OnnxFP4Linear(torch.nn.Module):
    """One LLM-FP4 linear in its ONNX form: (rotate →) fp4_matmul (+ bias). W4A16 folds the activation
    exponents into the weight's columns; W4A4 shifts and quantizes the activations in the graph."""

    def __init__(self, rec: FP4QuantizedLinear, bias: torch.Tensor | None, factors: _Factors | None = None):
        super().__init__()
        factors = _Factors() if factors is None else factors
        self.fqn, self.k, self.n = rec.fqn, rec.in_features, rec.out_features
        self.w_format, self.a_format = rec.w_format, rec.a_format
        a4 = rec.a_format is not None
        if a4 and rec.act_scale is None:
            raise LowbitError(f"layer {rec.fqn}: FP4 activations ({rec.a_format}) without an act_scale; the record "
                              f"is incomplete (re-quantize it)")
        shift = None if rec.act_exponents is None else rec.act_exponents.detach().to(torch.uint8).clone()
        self.register_buffer("qweight", rec.qweight.detach().reshape(onnx_ops.unpack_shape(4, self.n, self.k)).clone())
        self.register_buffer("w_scales", rec.w_scales.detach().to(torch.float16).reshape(-1, 1).clone())
        self.register_buffer("w_shift", None if a4 else shift)
        self.register_buffer("act_shift", shift if a4 else None)
        self.register_buffer("act_scale", rec.act_scale.detach().to(torch.float16).reshape(1).clone() if a4 else None)
        self.register_buffer("su", None if rec.su is None else pack_signs(rec.su))
        self.register_buffer("had_in", factors.get_factor(self.k) if rec.su is not None else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @property
    def route_name(self) -> str:
        return "FP4 table+MatMul" + (f", {self.a_format} activations" if self.a_format else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.su is not None:
            h = torch.ops.lowbit_onnx.rotate(h, self.su, self.had_in, None)
        y = torch.ops.lowbit_onnx.fp4_matmul(h, self.qweight, self.w_scales, self.w_shift, self.act_shift,
                                             self.act_scale, self.k, self.n, self.w_format, self.a_format)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def int_route(bits: int, standard_ops: bool = False, native_nbits: bool = False) -> str:
    """The route of an integer layer (onnx_ops' docstring): the fastest on onnxruntime's CPU kernels by default."""
    if standard_ops:
        return "dq"
    if bits == 2 and native_nbits:
        return "nbits2"
    return "fold" if bits == 8 and not native_nbits else "nbits"


def swap_for_onnx(model: torch.nn.Module, records: Mapping, standard_ops: bool = False,
                  native_nbits: bool = False) -> torch.nn.Module:
    """A copy of `model` with each linear of `records` replaced by its ONNX form, and each quantized embedding by
    its gather in standard ops (export/embedding.py)."""
    from ..nn import swap_linears

    factors, tables = _Factors(), _E8Tables()

    def make(rec, bias):
        if isinstance(rec, FP4QuantizedLinear):
            return OnnxFP4Linear(rec, bias, factors)
        if getattr(rec, "kind", "int") == "e8":
            return OnnxE8Linear(rec, bias, "fold" if standard_ops else "nbits", factors, tables)
        return OnnxLowbitLinear(rec, bias, int_route(rec.bits, standard_ops, native_nbits), factors)

    swapped = swap_linears(model, records, make_module=make, make_embedding=GatherEmbedding)
    _share_tied_tables(swapped, records)
    return swapped


def _share_tied_tables(model: torch.nn.Module, records: Mapping) -> None:
    """A tied head whose MatMulNBits weight holds the very bytes of its embedding's packed table (4-bit codes in
    blocks that fit the table's rows: the record's layout) hands the gather the same tensors, so the file holds
    the table once; the gather reads its rows from the (N, blocks, bytes) view."""
    mods = dict(model.named_modules())
    by_record: dict[int, list[str]] = {}
    for fqn, rec in records.items():
        by_record.setdefault(id(rec), []).append(fqn)
    for fqns in by_record.values():
        embs = [mods[f] for f in fqns if isinstance(mods.get(f), GatherEmbedding)]
        heads = [mods[f] for f in fqns if isinstance(mods.get(f), OnnxLowbitLinear)]
        for emb in embs:
            for head in heads:
                for name in ("qweight", "scales"):
                    a, b = getattr(emb, name), getattr(head, name)
                    if a.dtype == b.dtype and a.numel() == b.numel() and torch.equal(a.reshape(-1), b.reshape(-1)):
                        setattr(emb, name, b)


# ----------------------------------------------------------------------------- export


def exact_session_options():
    """onnxruntime SessionOptions that keep MatMulNBits exact (float activations, no int8 fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def _dynamic_shapes(model, args, kwargs):
    """The batch / sequence dimensions the model lets vary (inputs.free_dims), unbounded."""
    return dynamic_shapes_for(model, args, kwargs, lambda d, size: torch.export.Dim.DYNAMIC)


def finalize(path) -> None:
    """Post-process the saved file: retype the INT4 markers' uint8 initializers to INT4 (same bytes: ONNX packs
    int4 two per byte, element 0 in the low nibble), then drop the exporter's per-node debug metadata (stack
    traces, FX nodes), which can outweigh the weights. Works on external data too (only types and dims change)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    rename, keep = {}, []
    for node in g.node:
        if (node.domain, node.op_type) != onnx_ops.INT4_MARKER:
            keep.append(node)
            continue
        t = inits.get(node.input[0])
        shape = list(next(a.ints for a in node.attribute if a.name == "shape"))
        if t is None or t.data_type != onnx.TensorProto.UINT8:
            raise LowbitError(f"ONNX export: the INT4 weight {node.input[0]!r} is not a uint8 initializer; the "
                              f"exporter changed how it stores buffers")
        t.data_type = onnx.TensorProto.INT4
        del t.dims[:]
        t.dims.extend(shape)
        rename[node.output[0]] = node.input[0]
    del g.node[:]
    g.node.extend(keep)
    for n in g.node:
        for j, name in enumerate(n.input):
            if name in rename:
                n.input[j] = rename[name]
        del n.metadata_props[:]
        n.doc_string = ""
        n.name = ""  # node names are optional; the exporter's are long
    for v in (*g.value_info, *g.input, *g.output, *g.initializer):
        del v.metadata_props[:]
    del g.value_info[:]
    used = {n.domain for n in g.node}
    keep_ops = [o for o in m.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del m.opset_import[:]
    m.opset_import.extend(keep_ops)
    onnx.save(m, str(path))


def onnx_file_bytes(path) -> int:
    """Bytes of the .onnx file plus any external-data files it references."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locs)


@known_warnings
def export_onnx(model: torch.nn.Module, records, example_inputs, path, dynamic: bool = True, verify: bool = True,
                standard_ops: bool = False, opset_version: int = OPSET, external_data: bool | None = None,
                native_nbits: bool = False) -> ExportResult:
    """Export `model` with the quantized linears of `records` (a Checkpoint or {fqn: record}) to the ONNX file
    `path` (see the module docstring for the routes).

    example_inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors (HF models); dynamic
    makes dimensions 0 and 1 (batch, sequence) of the inputs dynamic where the model lets them vary
    (export/inputs.py: a dimension a weight fixes stays static; a size-1 example is traced at size 2).
    standard_ops: standard ONNX ops only (no com.microsoft MatMulNBits). native_nbits: 2- and 8-bit layers use
    MatMulNBits' own 2-/8-bit kernels (both much slower than widening 2-bit codes to 4 bits / dequantizing 8-bit
    weights at load, on CPU; memory 2/8 bits).
    external_data: weights in a side file `<name>.data` (default: when they exceed 1.5 GB).

    Returns an ExportResult (export/inputs.py): nbytes counts the file plus its external data; routes are
    {fqn: route description}; error / max_abs_error over every output tensor (verify=True). Raises LowbitError on
    an unsupported record, a failed export or a verification mismatch.
    """
    import onnx

    if opset_version not in OPSETS:
        raise LowbitError(f"opset {opset_version}: use {OPSETS.start}..{OPSETS.stop - 1} (blocked and INT4 "
                          f"DequantizeLinear need opset 21)")
    onnx_ops.register_schemas()
    from ..nn import swap_linears

    recs = records_of(records)
    swapped = swap_for_onnx(model, recs, standard_ops, native_nbits).eval()
    reference = swap_linears(model, recs).eval()  # the quantized model: what the file must compute
    args, kwargs = split_inputs(example_inputs)
    t_args, t_kwargs = args, kwargs
    if dynamic:
        t_args, t_kwargs, _ = widen_size_one_dims(reference, args, kwargs)
    path = Path(path)
    if external_data is None:
        n_bytes = sum(b.numel() * b.element_size() for b in swapped.state_dict().values())
        external_data = n_bytes > 1_500_000_000
    with torch.no_grad():
        try:
            prog = torch.onnx.export(
                swapped, t_args, kwargs=t_kwargs or None, dynamo=True, opset_version=opset_version,
                dynamic_shapes=_dynamic_shapes(reference, t_args, t_kwargs) if dynamic else None, optimize=False,
                custom_translation_table=onnx_ops.TRANSLATIONS, external_data=external_data, report=False,
                verbose=False)
        except Exception as e:  # the exporter raises many types; say where it failed
            raise LowbitError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: "
                              f"{str(e)[:2000]}") from e
    with atomic_outputs(path) as tmp:  # written beside `path` only once checked (and verified)
        prog.save(tmp, external_data=external_data)
        finalize(tmp)
        onnx.checker.check_model(tmp)
        routes = {fqn: m.route_name for fqn, m in swapped.named_modules()
                  if isinstance(m, (OnnxLowbitLinear, OnnxFP4Linear, OnnxE8Linear))}
        result = ExportResult(path=path, nbytes=onnx_file_bytes(tmp), routes=routes,
                              quantized_weights=quantized_weights(recs), atol=ATOL, rtol=RTOL)
        if verify:
            try:
                result.error, result.max_abs_error = verify_onnx(reference, tmp, args, kwargs)
            except LowbitError as e:
                raise LowbitError(f"{e}; nothing was written (verify=False writes the file anyway)") from None
    return result


def run_onnx(path, feeds: Mapping[str, torch.Tensor], threads: int | None = None, all_outputs: bool = False):
    """The first output of the ONNX file on `feeds` (every output, in order, with all_outputs=True)."""
    import onnxruntime as ort

    so = exact_session_options()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: feeds[n].numpy() for n in names})
    return [torch.from_numpy(o) for o in out] if all_outputs else torch.from_numpy(out[0])


def _feeds(path, args, kwargs) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in init]
    if kwargs:
        tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        by_name = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        return {n: by_name.get(n, t) for n, t in zip(names, tensors, strict=True)}
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return dict(zip(names, tensors, strict=True))


def verify_onnx(torch_model, path, args, kwargs) -> tuple[float, float]:
    """Compare onnxruntime with the PyTorch model on the example inputs, every output tensor (in pytree order, the
    order the exporter flattens them in); returns (relative error, max abs error), LowbitError beyond tolerance."""
    with torch.no_grad():
        refs = [t.to(torch.float32) for t in tensor_leaves(torch_model(*args, **kwargs))]
    got = [t.to(torch.float32) for t in run_onnx(path, _feeds(path, args, kwargs), all_outputs=True)]
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in refs]:
        raise LowbitError(f"ONNX verification: output shapes {[tuple(t.shape) for t in got]} != PyTorch "
                          f"{[tuple(t.shape) for t in refs]}")
    for i, (y, r) in enumerate(zip(got, refs)):
        err = float((y - r).abs().max()) if r.numel() else 0.0
        tol = RTOL * float(r.abs().max() if r.numel() else 0.0) + ATOL
        if not err <= tol:
            raise LowbitError(f"ONNX verification failed for {path}: output {i}: max |onnxruntime − PyTorch| = "
                              f"{err:.3g} > {tol:.3g}; the exported graph does not compute the quantized model")
    return max_rel_error(got, refs), max_abs_error(got, refs)


__all__ = ["export_onnx", "exact_session_options", "finalize", "onnx_file_bytes", "swap_for_onnx", "OnnxLowbitLinear",
           "OnnxFP4Linear", "OnnxE8Linear", "run_onnx", "verify_onnx"]
