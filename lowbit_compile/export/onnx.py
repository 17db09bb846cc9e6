"""Export quantized models to ONNX that onnxruntime runs with its low-bit kernels.

`export_onnx(model, records, example_inputs, path)` swaps every quantized nn.Linear for an `OnnxLowbitLinear`
and exports with `torch.onnx.export(dynamo=True)` (dynamic batch and sequence axes). Per layer:

- Integer 2/4/8-bit weights → `com.microsoft::MatMulNBits` (onnxruntime's CPU low-bit kernel). The packed
  bytes are used as stored (packing along K, element 0 in the low bits is MatMulNBits' layout), only
  reshaped to (N, blocks, block bytes); when no block size in 128/64/32/16 divides K, K is padded up with
  the zero-point code (contributes 0). Block size = the largest of 128..16 dividing both K and the scale
  group.
  Scales are stored in the file as the record's float16 (N, groups) and widened/repeated to float32 blocks
  by Cast/Expand nodes that onnxruntime constant-folds at session creation, so the file holds ~16 bits per
  group, not 32 per block.
  4 and 8 bits use MatMulNBits' default zero point 2^(bits-1), which is our grid's. 2 bits use the midrise
  zero point 1.5: MatMulNBits runs with its default zero point 2, and the missing +0.5·scale·Σx per group
  is added by a small (groups × N) MatMul of group sums, built from the same float16 scales.
- 3-bit weights (no MatMulNBits kernel), and every width with `standard_ops=True`: the codes are unpacked in
  the graph with integer ops only (Reshape, Mul/Add to an int32 word, Div/Mod — never BitShift) and
  dequantized, then a plain MatMul. The file still holds the packed bytes; onnxruntime folds the float
  weight in memory at load time.
- The randomized Hadamard transforms (`su`, `sv`), n = Kf·P1·P2: the input reshaped to (..., Kf, P1, P2)
  and one small MatMul per axis (Sylvester H_P1, H_P2 and the Kf×Kf factor, stored as int8 ±1 and scaled in
  the graph): no dense n×n matrix, ~3 nodes per transform instead of 7 per butterfly stage (the butterfly
  version made the graph itself ~1.8 bits per weight on a hidden-384 model), and fewer, larger kernels for
  onnxruntime. Sign vectors are stored as float16 when that is exact (±1), else float32.
- FP4 (LLM-FP4 W4A16) weights: codes split with % 16 / // 16 and decoded through a 16-entry Gather table
  (`OnnxFP4Linear`); FP4 activations (W4A4) raise LowbitError for now.

The file is written with `optimize=False` so that the exporter cannot constant-fold packed weights back to
float (the test suite checks the file size).

Running the result: onnxruntime's graph optimizer may fuse DequantizeLinear→MatMul into MatMulNBits with
int8-quantized activations (accuracy_level 4). To keep MatMulNBits exact (float32 activations), set the
session option documented in `exact_session_options()`:

    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")

`verify=True` (the default) runs onnxruntime (CPUExecutionProvider, that option set) on the example inputs
and raises LowbitError when the outputs differ from the PyTorch quantized model beyond float32 rounding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import formats, hadamard
from ..checkpoint import FP4QuantizedLinear, QuantizedLinear
from ..errors import LowbitError

MATMULNBITS_BITS = (2, 4, 8)
BLOCK_SIZES = (128, 64, 32, 16)
OPSET = 21
# Verification tolerance: |onnx − torch| ≤ RTOL·max|torch| + ATOL. Both sides compute in float32 with
# different summation orders (MatMulNBits blocks, butterfly vs. reference Hadamard); a wrong code, scale,
# zero point or transform gives errors of the order of the outputs themselves.
RTOL = 2e-3
ATOL = 1e-4


# ----------------------------------------------------------------------------- MatMulNBits schema + op


def register_matmulnbits_schema() -> None:
    """Register com.microsoft::MatMulNBits with onnx so the exporter and onnx.checker accept it."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    A = OpSchema.AttrType
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        doc="onnxruntime contrib op: MatMul with block-quantized N-bit weights (B packed along K).",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)",
                                  "tensor(bfloat16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("K", A.INT, "", required=True),
                    OpSchema.Attribute("N", A.INT, "", required=True),
                    OpSchema.Attribute("bits", A.INT, "", required=True),
                    OpSchema.Attribute("block_size", A.INT, "", required=True),
                    OpSchema.Attribute("accuracy_level", A.INT, "", required=False)],
    )
    onnx.defs.register_schema(schema)


@torch.library.custom_op("lowbit_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, k: int, n: int, bits: int,
                 block: int) -> torch.Tensor:
    """What MatMulNBits computes (default zero point 2^(bits-1)): x (..., k) · dequant(b)ᵀ → (..., n)."""
    kp = b.shape[1] * block
    codes = formats.unpack(b.reshape(n, -1), bits, kp)[:, :k]
    s = scales.reshape(n, -1).to(torch.float32).repeat_interleave(block, dim=1)[:, :k]
    w = (codes.to(torch.float32) - float(1 << (bits - 1))) * s
    return torch.nn.functional.linear(x.to(torch.float32), w).to(x.dtype)


@matmul_nbits.register_fake
def _(x, b, scales, k, n, bits, block):
    return x.new_empty((*x.shape[:-1], n))


def _matmul_nbits_onnx(x, b, scales, k: int, n: int, bits: int, block: int):
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)
    return msft.MatMulNBits(x, b, scales, K=k, N=n, bits=bits, block_size=block)


# ----------------------------------------------------------------------------- the module


def choose_block(k: int, group_size: int) -> int:
    """MatMulNBits block: must divide the scale group; prefer no padding of K, then the larger block."""
    g = k if group_size == 0 else group_size
    cands = [b for b in BLOCK_SIZES if g % b == 0]
    if not cands:  # a group that no block divides (only possible for per-row scales, g = K)
        if group_size:
            raise LowbitError(f"group size {group_size}: MatMulNBits needs a block of 16..256 dividing the group; "
                              f"use group sizes that are multiples of 16")
        cands = list(BLOCK_SIZES)
    return min(cands, key=lambda b: (-(-k // b) * b, -b))


def _small_float(t: torch.Tensor) -> torch.Tensor:
    """float16 when exact (±1 signs), else float32."""
    t = t.detach().to(torch.float32)
    h = t.to(torch.float16)
    return h if torch.equal(h.to(torch.float32), t) else t.clone()


def _compact_factor(f: torch.Tensor | None) -> torch.Tensor | None:
    """A Hadamard factor H/√K stored as int8 ±1 (scaled back in the graph); a random orthogonal one as is."""
    if f is None:
        return None
    h = torch.round(f * math.sqrt(f.shape[0]))
    if torch.equal(h.abs(), torch.ones_like(h)) and torch.allclose(h / math.sqrt(f.shape[0]), f, atol=1e-6):
        return h.to(torch.int8)
    return f


class OnnxLowbitLinear(torch.nn.Module):
    """One quantized linear in an ONNX-friendly form (see the module docstring)."""

    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None, standard_ops: bool = False):
        super().__init__()
        self.fqn, self.bits = rec.fqn, rec.bits
        self.k, self.n, self.group_size = rec.in_features, rec.out_features, rec.group_size
        self.groups = formats.num_groups(self.k, self.group_size)
        self.nbits = rec.bits in MATMULNBITS_BITS and not standard_ops
        self.register_buffer("scales", rec.scales.detach().to(torch.float16).clone())
        if self.nbits:
            self.block = choose_block(self.k, self.group_size)
            kp = -(-self.k // self.block) * self.block
            codes = formats.unpack(rec.qweight, rec.bits, self.k)
            if kp != self.k:  # pad with the zero-point code: contributes nothing
                pad = torch.full((self.n, kp - self.k), 1 << (rec.bits - 1), dtype=torch.uint8)
                qw = formats.pack(torch.cat((codes, pad), dim=1), rec.bits)
            else:
                qw = rec.qweight.detach()
            self.register_buffer("qweight", qw.reshape(self.n, kp // self.block, -1).contiguous().clone())
        else:
            self.register_buffer("qweight", rec.qweight.detach().clone())
            per_group, n_bytes = formats.packing.group_shape(rec.bits)
            self.per_group, self.n_bytes = per_group, n_bytes
        self.register_buffer("su", None if rec.su is None else _small_float(rec.su))
        self.register_buffer("sv", None if rec.sv is None else _small_float(rec.sv))
        f_in = hadamard.factor(self.k) if rec.su is not None else None
        f_out = hadamard.factor(self.n) if rec.sv is not None else None
        self.register_buffer("had_in", _compact_factor(f_in))
        self.register_buffer("had_out", None if f_out is None else _compact_factor(f_out.t().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self._h = {}  # P -> (H_P1, H_P2) int8 Sylvester factors (buffers), for P = K / Kf of each transform
        for name, n, f in (("in", self.k, f_in if rec.su is not None else None),
                           ("out", self.n, f_out if rec.sv is not None else None)):
            if (name == "in" and rec.su is None) or (name == "out" and rec.sv is None):
                continue
            p = n // (1 if f is None else f.shape[0])
            if p in self._h or p == 1:
                continue
            e = p.bit_length() - 1
            q1 = 1 << (e // 2)
            mats = []
            for i, q in enumerate((q1, p // q1)):
                if q == 1:
                    mats.append(None)
                    continue
                self.register_buffer(f"h{p}_{i}", torch.from_numpy(hadamard._sylvester(q).astype("int8")))
                mats.append(q)
            self._h[p] = tuple(None if q is None else f"h{p}_{i}" for i, q in enumerate(mats))

    def _buf(self, name):
        return None if name is None else getattr(self, name)

    # Hadamard: (F ⊗ H_P1 ⊗ H_P2)/√P on the last dimension, P = P1·P2: one small MatMul per axis of the input
    # reshaped to (..., Kf, P1, P2) (F given already transposed for the inverse). Fewer nodes and faster in
    # onnxruntime than log2(P) butterfly stages; stores only Kf² + P1² + P2² int8 entries.
    def _rotate(self, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[-1]
        kf = 1 if f is None else f.shape[0]
        p = n // kf
        lead = x.shape[:-1]
        y = x
        h1, h2 = self._pow2_factors(p)
        if h2 is not None:
            y = torch.matmul(y.reshape(*lead, n // h2.shape[0], h2.shape[0]), h2.to(torch.float32))
        if h1 is not None:
            q1 = h1.shape[0]
            q2 = 1 if h2 is None else h2.shape[0]
            y = torch.matmul(h1.to(torch.float32), y.reshape(*lead, kf, q1, q2))
        if f is not None:
            f = f.to(torch.float32) * (1.0 / math.sqrt(kf)) if f.dtype == torch.int8 else f
            y = torch.matmul(f, y.reshape(*lead, kf, p))
        return y.reshape(*lead, n) * (1.0 / math.sqrt(p))

    def _pow2_factors(self, p: int):
        names = self._h.get(p, (None, None))
        return self._buf(names[0]), self._buf(names[1])

    def _weight_std(self) -> torch.Tensor:
        """Integer-op unpack (no BitShift) + dequantize → float32 (N, K)."""
        b = self.qweight.reshape(self.n, -1, self.n_bytes).to(torch.int32)
        word = b[..., 0]
        for i in range(1, self.n_bytes):
            word = word + b[..., i] * (1 << (8 * i))
        levels = 1 << self.bits
        div = torch.tensor([levels ** j for j in range(self.per_group)], dtype=torch.int32)
        codes = torch.remainder(torch.floor_divide(word.unsqueeze(-1), div), levels)
        codes = codes.reshape(self.n, -1)[:, :self.k]
        zero = formats.int_format(self.bits).zero
        s = self.scales.to(torch.float32)
        if self.groups > 1:
            s = s.repeat_interleave(self.k // self.groups, dim=1)
        return (codes.to(torch.float32) - zero) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.su is not None:
            h = self._rotate(h * self.su.to(torch.float32), self.had_in)
        if self.nbits:
            reps = (self.k if self.group_size == 0 else self.group_size) // self.block
            s = self.scales.to(torch.float32)
            kb = self.qweight.shape[1]
            if reps > 1 or s.shape[1] != kb:  # per-row scales or groups larger than a block
                s = s.unsqueeze(-1).expand(self.n, self.groups, reps).reshape(self.n, self.groups * reps)
                if s.shape[1] < kb:  # padded blocks (per-row scales only)
                    s = torch.cat((s, s[:, :1].expand(self.n, kb - s.shape[1])), dim=1)
            y = torch.ops.lowbit_onnx.matmul_nbits(h, self.qweight, s.reshape(-1), self.k, self.n, self.bits,
                                                   self.block)
            if self.bits == 2:  # midrise zero 1.5 = MatMulNBits' 2 − 0.5: add 0.5·Σ_group(x)·scale
                if self.groups == 1:
                    y = y + h.sum(dim=-1, keepdim=True) * (0.5 * self.scales[:, 0].to(torch.float32))
                else:
                    sums = h.reshape(*h.shape[:-1], self.groups, self.k // self.groups).sum(dim=-1)
                    y = y + torch.matmul(sums, 0.5 * self.scales.to(torch.float32).t())
        else:
            y = torch.nn.functional.linear(h, self._weight_std())
        if self.sv is not None:
            y = self._rotate(y, self.had_out) * self.sv.to(torch.float32)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class OnnxFP4Linear(torch.nn.Module):
    """An LLM-FP4 W4A16 linear: the packed codes are split with % 16 and // 16 (no BitShift), decoded through a
    16-entry Gather table (onnxruntime has no FP4 DequantizeLinear on CPU), times the per-row scales and the
    per-channel 2**k (Pow of the stored uint8 exponents), then MatMul. onnxruntime folds the float weight in
    memory at load time; the file keeps 4-bit codes. W4A4 (FP4 activations) is not exported yet."""

    def __init__(self, rec: FP4QuantizedLinear, bias: torch.Tensor | None):
        super().__init__()
        from ..formats import fp4 as f4

        if rec.a_format is not None:
            raise LowbitError(f"layer {rec.fqn}: FP4 activations (W4A4, a_format={rec.a_format!r}) are not "
                              f"exported to ONNX yet; use a W4A16 FP4 recipe (w4a16-fp4) or an integer recipe")
        self.fqn, self.k, self.n = rec.fqn, rec.in_features, rec.out_features
        self.register_buffer("qweight", rec.qweight.detach().clone())
        self.register_buffer("table", f4.fp4_format(rec.w_format).grid(0.0).to(torch.float32).clone())
        self.register_buffer("w_scales", rec.w_scales.detach().to(torch.float16).reshape(-1, 1).clone())
        self.register_buffer("act_shift", None if rec.act_exponents is None else rec.act_exponents.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def weight(self) -> torch.Tensor:
        b = self.qweight.to(torch.int32)
        codes = torch.stack((torch.remainder(b, 16), torch.floor_divide(b, 16)), dim=-1)
        codes = codes.reshape(self.n, -1)[:, :self.k]
        w = torch.index_select(self.table, 0, codes.reshape(-1).to(torch.int64)).reshape(self.n, self.k)
        w = w * self.w_scales.to(torch.float32)
        if self.act_shift is not None:
            w = w * torch.pow(2.0, self.act_shift.to(torch.float32))
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(torch.float32), self.weight())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def swap_for_onnx(model: torch.nn.Module, records: Mapping, standard_ops: bool = False) -> torch.nn.Module:
    from ..nn import swap_linears

    def make(rec, bias):
        if isinstance(rec, FP4QuantizedLinear):
            return OnnxFP4Linear(rec, bias)
        return OnnxLowbitLinear(rec, bias, standard_ops)

    return swap_linears(model, records, make_module=make)


# ----------------------------------------------------------------------------- export


def exact_session_options():
    """onnxruntime SessionOptions that keep MatMulNBits exact (float activations, no int8 fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def _as_tuple(example_inputs):
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _records(records_or_checkpoint) -> Mapping:
    recs = getattr(records_or_checkpoint, "records", records_or_checkpoint)
    if not isinstance(recs, Mapping):
        raise LowbitError("export_onnx expects a {fqn: record} mapping or a Checkpoint")
    return recs


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        seq = out.to_tuple() if hasattr(out, "to_tuple") else out
        return _first_tensor(seq[0])
    raise LowbitError(f"cannot find an output tensor in {type(out).__name__}")


def _batch2(inputs):
    """Trace with batch ≥ 2: torch.export specializes a dynamic dimension whose example size is 1."""
    def grow(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1:
            return t.repeat(2, *([1] * (t.dim() - 1)))
        return t

    if isinstance(inputs, Mapping):
        return {k: grow(v) for k, v in inputs.items()}
    return tuple(grow(a) for a in inputs)


def _dynamic_shapes(args, kwargs, dynamic: bool):
    if not dynamic:
        return None
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC

    def spec(t):
        if not isinstance(t, torch.Tensor):
            return None
        return {0: batch, 1: seq} if t.dim() >= 2 else {0: batch}

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def strip_metadata(path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX nodes): it can outweigh the weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for i, n in enumerate(m.graph.node):
        del n.metadata_props[:]
        n.doc_string = ""
        n.name = f"n{i}"  # node names are optional and unique here; the exporter's are long
    for v in (*m.graph.value_info, *m.graph.input, *m.graph.output, *m.graph.initializer):
        del v.metadata_props[:]
    del m.graph.value_info[:]
    onnx.save(m, str(path))


def onnx_file_bytes(path) -> int:
    """Bytes of the .onnx file plus any external-data files it references."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locs)


def export_onnx(model: torch.nn.Module, records, example_inputs, path, dynamic: bool = True, verify: bool = True,
                standard_ops: bool = False, opset_version: int = OPSET, external_data: bool | None = None):
    """Export `model` with the quantized linears of `records` to the ONNX file `path`.

    Returns a dict: path, bytes, routes ({fqn: "MatMulNBits" | "unpack+MatMul"}), max_abs_error (when
    verified). Raises LowbitError on unsupported records or a verification mismatch.
    """
    import onnx

    if not 21 <= opset_version <= 23:
        raise LowbitError(f"opset {opset_version}: use 21..23 (onnxruntime 1.31 and the exporter agree there)")
    register_matmulnbits_schema()
    recs = _records(records)
    swapped = swap_for_onnx(model, recs, standard_ops).eval()
    args, kwargs = _as_tuple(example_inputs)
    t_args, t_kwargs = (_batch2(args), _batch2(kwargs)) if dynamic else (args, kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        n_bytes = sum(b.numel() * b.element_size() for b in swapped.state_dict().values())
        external_data = n_bytes > 1_500_000_000
    with torch.no_grad():
        try:
            prog = torch.onnx.export(
                swapped, t_args, kwargs=t_kwargs or None, dynamo=True, opset_version=opset_version,
                dynamic_shapes=_dynamic_shapes(t_args, t_kwargs, dynamic), optimize=False,
                custom_translation_table={torch.ops.lowbit_onnx.matmul_nbits.default: _matmul_nbits_onnx},
                external_data=external_data, report=False)
        except Exception as e:  # the exporter raises many types; say where it failed
            raise LowbitError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: "
                              f"{str(e)[:2000]}") from e
    prog.save(str(path), external_data=external_data)
    strip_metadata(path)
    onnx.checker.check_model(str(path))
    routes = {fqn: ("MatMulNBits" if m.nbits else "unpack+MatMul") if isinstance(m, OnnxLowbitLinear)
              else "fp4 Gather table+MatMul"
              for fqn, m in swapped.named_modules() if isinstance(m, (OnnxLowbitLinear, OnnxFP4Linear))}
    result = {"path": str(path), "bytes": onnx_file_bytes(path), "routes": routes}
    if verify:
        from ..nn import swap_linears

        result["max_abs_error"] = verify_onnx(swap_linears(model, recs).eval(), path, args, kwargs)
    return result


def run_onnx(path, feeds: Mapping[str, torch.Tensor], threads: int | None = None):
    import onnxruntime as ort

    so = exact_session_options()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: feeds[n].numpy() for n in names})
    return torch.from_numpy(out[0])


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


def verify_onnx(torch_model, path, args, kwargs) -> float:
    """Compare onnxruntime with the PyTorch model on the example inputs; LowbitError beyond tolerance."""
    with torch.no_grad():
        ref = _first_tensor(torch_model(*args, **kwargs)).to(torch.float32)
    got = run_onnx(path, _feeds(path, args, kwargs)).to(torch.float32)
    if got.shape != ref.shape:
        raise LowbitError(f"ONNX verification: output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
    err = float((got - ref).abs().max())
    tol = RTOL * float(ref.abs().max()) + ATOL
    if not err <= tol:
        raise LowbitError(f"ONNX verification failed for {path}: max |onnxruntime − PyTorch| = {err:.3g} > "
                          f"{tol:.3g}; the exported graph does not compute the quantized model")
    return err


__all__ = ["export_onnx", "exact_session_options", "onnx_file_bytes", "register_matmulnbits_schema",
           "swap_for_onnx", "OnnxLowbitLinear", "OnnxFP4Linear", "run_onnx", "verify_onnx"]
