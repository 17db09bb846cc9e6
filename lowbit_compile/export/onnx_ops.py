"""`lowbit_onnx::` ops: the pieces of an exported quantized linear, one FX node each, expanded by their
translation functions (`TRANSLATIONS`, given to `torch.onnx.export(custom_translation_table=...)`) into the
ONNX subgraph onnxruntime runs. One node per piece keeps torch.export's work (and the export time) close to
that of the float model, and lets the translation choose the exact ONNX ops (BitShift/BitwiseAnd on uint8,
INT4 DequantizeLinear, MatMulNBits), which aten decompositions cannot express.

Every op has a plain-torch implementation of what its ONNX subgraph computes (used in eager mode and in the
tests) and a fake. Everything derived from constants only (unpacking, widening, scale expansion, sign
vectors) is folded by onnxruntime into initializers when the session is created, so the file keeps the
packed low-bit bytes and the runtime sees one kernel per linear.

- `rotate(x, signs_in, factor, signs_out)`: signs_out ⊙ ((F ⊗ H_P)/√P)(signs_in ⊙ x) on the last dimension,
  n = Kf·P. H_P = H_P1 ⊗ H_P2 (Sylvester) is applied as one small MatMul per axis of x reshaped to
  (..., Kf, P1, P2), F (Kf×Kf; int8 ±1 for a Hadamard factor, scaled in the graph, or a float orthogonal one)
  as a third: no dense n×n matrix. Sign vectors are stored one bit each (uint8, bit 1 = −1) when they are ±1.
- `int_matmul(x, qweight, scales, bits, k, n, group_size, block, route)`: x · Ŵᵀ with Ŵ = (code − zero)·scale.
  Routes and stored forms of `qweight`:
    "nbits"   MatMulNBits. 4/8 bits: the record's bytes as (n, blocks, block bytes), K padded to whole blocks
              with the zero code. 2/3 bits: the record's packed bytes; the graph unpacks them (BitShift,
              BitwiseAnd), widens each code exactly to 4 bits (u = 2c + 9 − 2^bits, scale/2: (u − 8)·s/2 =
              (c − zero)·s for the midrise zero (2^bits − 1)/2) and packs MatMulNBits' 4-bit B. onnxruntime's
              2-bit CPU kernel is 50–150× slower than its 4-bit one at batch 1; the widened weight costs 4 bits
              in memory, the file keeps 2/3.
    "nbits2"  (2 bits only, for comparison) MatMulNBits bits=2 on the record's bytes padded to whole blocks;
              MatMulNBits' zero point 2 differs from the midrise 1.5, so 0.5·scale·Σ_group x is added.
    "fold"    (8 bits) int8 (code − 128), (n, k), dequantized by Cast/Mul nodes that onnxruntime folds into a
              float32 weight at load: the float MatMul's speed (onnxruntime's 8-bit MatMulNBits is ~30× slower
              than float on CPU at batch 1; "nbits" keeps it), 8 bits per weight in the file, 32 in memory.
    "dq"      standard ops only. 4 bits: int4 values (code − 8) in (k, n) order, stored as uint8 pairs and retyped
              to an INT4 initializer after export (`INT4_MARKER`). 8 bits: int8 (code − 128), (k, n). 2/3 bits:
              the record's bytes, unpacked and widened as above to int8 2c + 1 − 2^bits, Cast to INT4. Then
              blocked DequantizeLinear (axis 0) and MatMul, the QDQ form that onnxruntime fuses into MatMulNBits
              (with `session.qdq_matmulnbits_accuracy_level` deciding its activation precision).
- `e8_matmul(x, qweight, scales, magnitudes, signs, offsets, ball, bits, k, n, block, route)`: E8 lattice codes
  (formats/e8p.py), the record's bytes as (n, k / 8, bits). Each E8P code's 4-bit digits d = 2C + 7.5 come from
  the int8 tables of `e8p.digit_tables()` (initializers shared by every E8 layer): magnitudes[hi] ⊙ signs[lo] +
  offsets[lo] with lo, hi the code's bytes (Split, Gather, Mul, Add on int32); at 3 bits v = 2·d₁ + ball[c₂] is split
  into min(v, 15) and v − min(v, 15). Route "nbits": per stage, the digits packed as MatMulNBits' 4-bit B with
  float zero points 7.5 and scales m·s (e8p.DIGIT_MULTIPLIERS), the stages' products added; "fold" (standard ops):
  Σ m·(d − 7.5)·s as a float weight and a MatMul. Both fold at session creation.
- `fp4_matmul(x, qweight, w_scales, w_shift, act_shift, act_scale, k, n, w_format, a_format)`: LLM-FP4.
  Codes split with BitShift/BitwiseAnd and decoded through a 16-entry Gather table (onnxruntime has no FP4
  DequantizeLinear on CPU), times the row scales and 2**w_shift (W4A16: the activation exponents fold into the
  weight's columns). W4A4: x ⊙ 2**act_shift is rounded per tensor to the activation format's grid: the
  magnitude code is the number of the 7 midpoints between magnitudes that |x|/scale exceeds (each placed so
  that a tie goes to the even code as in `formats.fp4.quantize`), the value a Gather of the magnitude table:
  bit-exact with the reference. (A MatMul of the comparisons with the magnitude steps was 20× slower in
  onnxruntime than this ReduceSum.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import formats, hadamard
from ..formats import e8p
from ..formats import fp4 as f4
from ..kernels.fp4_ops import quantize_fp4_activations

MATMULNBITS_BITS = (2, 4, 8)
ROUTES = ("nbits", "nbits2", "fold", "dq")
INT4_MARKER = ("lowbit_onnx", "Int4Bytes")  # (domain, op type) of the node `finalize` turns into an INT4 initializer


# ----------------------------------------------------------------------------- schemas


def register_schemas() -> None:
    """Register com.microsoft::MatMulNBits (onnxscript and onnx.checker need a schema) and the INT4 marker."""
    import onnx
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    A = OpSchema.AttrType

    def missing(name, domain):
        try:
            onnx.defs.get_schema(name, 1, domain)
            return False
        except onnx.defs.SchemaError:
            return True

    if missing("MatMulNBits", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
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
                        OpSchema.Attribute("accuracy_level", A.INT, "", required=False)]))
    if missing(INT4_MARKER[1], INT4_MARKER[0]):
        onnx.defs.register_schema(OpSchema(
            INT4_MARKER[1], INT4_MARKER[0], 1,
            doc="lowbit export marker: these uint8 bytes are an INT4 tensor of `shape` (removed after export).",
            inputs=[P("bytes", "T1")], outputs=[P("Y", "T2")],
            type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(int4)"], "")],
            attributes=[OpSchema.Attribute("shape", A.INTS, "", required=True)]))


def _op():
    from onnxscript import opset21

    return opset21


def _const(op, array: np.ndarray):
    import onnx_ir as ir

    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def _ints(op, values):
    return _const(op, np.asarray(values, dtype=np.int64))


FLOAT, UINT8, INT8, INT32, UINT32, INT64, INT4 = 1, 2, 3, 6, 12, 7, 22  # onnx.TensorProto data types


# ----------------------------------------------------------------------------- signs and rotations


def pack_signs(s: Tensor) -> Tensor:
    """±1 signs → uint8 bits (bit 1 = −1), element 0 in the low bit; other vectors stay float (16 when exact)."""
    s = s.detach().to(torch.float32)
    if torch.equal(s.abs(), torch.ones_like(s)):
        bits = (s < 0).to(torch.uint8)
        bits = torch.nn.functional.pad(bits, (0, -len(bits) % 8)).reshape(-1, 8)
        return (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)
    h = s.to(torch.float16)
    return h if torch.equal(h.to(torch.float32), s) else s.clone()


def unpack_signs(t: Tensor, n: int) -> Tensor:
    if t.dtype != torch.uint8:
        return t.to(torch.float32)
    bits = (t.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].to(torch.float32)


def compact_factor(f: Tensor | None) -> Tensor | None:
    """A Hadamard factor H/√K stored as int8 ±1 (scaled back in the graph); a random orthogonal one as is."""
    if f is None:
        return None
    h = torch.round(f * math.sqrt(f.shape[0]))
    if torch.equal(h.abs(), torch.ones_like(h)) and torch.allclose(h / math.sqrt(f.shape[0]), f, atol=1e-6):
        return h.to(torch.int8)
    return f.clone()


def _float_factor(factor: Tensor) -> Tensor:
    if factor.dtype == torch.int8:
        return factor.to(torch.float32) * (1.0 / math.sqrt(factor.shape[0]))
    return factor.to(torch.float32)


def _split_pow2(p: int) -> tuple[int, int]:
    q1 = 1 << ((p.bit_length() - 1) // 2)
    return q1, p // q1


@torch.library.custom_op("lowbit_onnx::rotate", mutates_args=())
def rotate(x: Tensor, signs_in: Tensor | None, factor: Tensor | None, signs_out: Tensor | None) -> Tensor:
    """signs_out ⊙ ((F ⊗ H_P)/√P)(signs_in ⊙ x), last dimension (see the module docstring)."""
    n = x.shape[-1]
    y = x.to(torch.float32)
    if signs_in is not None:
        y = y * unpack_signs(signs_in, n)
    y = hadamard.apply(y, None, None if factor is None else _float_factor(factor))
    if signs_out is not None:
        y = y * unpack_signs(signs_out, n)
    return y


@rotate.register_fake
def _(x, signs_in, factor, signs_out):
    return torch.empty_like(x, dtype=torch.float32)


def _signs_onnx(op, s, n: int, scale: float):
    """scale · signs as float32 (n,): packed bits through a 2-entry Gather table, float vectors Cast and scaled."""
    if s.dtype.name == "UINT8":
        bits = op.BitwiseAnd(op.BitShift(op.Reshape(s, _ints(op, [-1, 1])), _const(op, np.arange(8, dtype=np.uint8)),
                                         direction="RIGHT"), _const(op, np.array(1, np.uint8)))
        bits = op.Reshape(bits, _ints(op, [-1]))
        if n % 8:
            bits = op.Slice(bits, _ints(op, [0]), _ints(op, [n]))
        return op.Gather(_const(op, np.array([scale, -scale], np.float32)), op.Cast(bits, to=INT64))
    return op.Mul(op.Cast(s, to=FLOAT), _const(op, np.array(scale, np.float32)))


def _rotate_onnx(x, signs_in, factor, signs_out):
    op = _op()
    n, rank = int(x.shape[-1]), len(x.shape)
    lead = [0] * (rank - 1)  # Reshape's 0 copies the (dynamic) leading dimensions
    kf = 1 if factor is None else int(factor.shape[0])
    p = n // kf
    q1, q2 = _split_pow2(p)
    # one scalar for 1/√P (and 1/√Kf of an int8 factor), applied with the first sign vector
    scale = 1.0 / math.sqrt(p * (kf if factor is not None and factor.dtype.name == "INT8" else 1))
    y = x
    if signs_in is not None:
        y = op.Mul(y, _signs_onnx(op, signs_in, n, scale))
    if q2 > 1:
        h2 = op.Cast(_const(op, hadamard._sylvester(q2).astype(np.int8)), to=FLOAT)
        y = op.MatMul(op.Reshape(y, _ints(op, lead + [n // q2, q2])), h2)
    if q1 > 1:
        h1 = op.Cast(_const(op, hadamard._sylvester(q1).astype(np.int8)), to=FLOAT)
        y = op.MatMul(h1, op.Reshape(y, _ints(op, lead + [kf, q1, q2])))
    if factor is not None:
        y = op.MatMul(op.Cast(factor, to=FLOAT), op.Reshape(y, _ints(op, lead + [kf, p])))
    if q2 > 1 or q1 > 1 or factor is not None:
        y = op.Reshape(y, _ints(op, lead + [n]))
    if signs_out is not None:
        return op.Mul(y, _signs_onnx(op, signs_out, n, 1.0 if signs_in is not None else scale))
    return y if signs_in is not None else op.Mul(y, _const(op, np.array(scale, np.float32)))


# ----------------------------------------------------------------------------- integer weights


def widen_table(bits: int, signed: bool) -> np.ndarray:
    """Code c of a 2/3-bit midrise grid → the 4-bit code of the same value at half the scale: signed 2c + 1 − 2^bits
    (an int4 value), or unsigned with MatMulNBits' zero point 8."""
    c = np.arange(1 << bits)
    v = 2 * c + 1 - (1 << bits)
    return v.astype(np.int8) if signed else (v + 8).astype(np.uint8)


def pad_codes(codes: Tensor, kp: int, fill: int) -> Tensor:
    if codes.shape[1] == kp:
        return codes
    pad = torch.full((codes.shape[0], kp - codes.shape[1]), fill, dtype=torch.uint8)
    return torch.cat((codes, pad), dim=1)


def stored_codes(qweight: Tensor, bits: int, k: int, n: int, route: str) -> Tensor:
    """The (n, k) uint8 codes of `qweight` in the stored form of its route (inverse of OnnxLowbitLinear's packing)."""
    if route == "dq" and bits == 4:
        v = formats.unpack(qweight.reshape(1, -1), 4, k * n).reshape(k, n)
        return (v ^ 8).t().contiguous()  # int4 two's complement nibble of code − 8 → code
    if route == "dq" and bits == 8:
        return (qweight.view(torch.uint8) ^ 0x80).t().contiguous()
    if route == "fold":
        return qweight.view(torch.uint8) ^ 0x80
    flat = qweight.reshape(n, -1)
    if bits in (2, 3) and route != "nbits2":  # the record's bytes, in unpack_shape
        return formats.unpack(flat, bits, k)
    return formats.unpack(flat, bits, flat.shape[1] * 8 // bits)[:, :k]  # MatMulNBits blocks, K padded


def _expanded_scales(scales: Tensor, k: int, group_size: int) -> Tensor:
    s = scales.to(torch.float32)
    return s.repeat_interleave(k // s.shape[1], dim=1) if s.shape[1] > 1 else s


@torch.library.custom_op("lowbit_onnx::int_matmul", mutates_args=())
def int_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, k: int, n: int, group_size: int, block: int,
               route: str) -> Tensor:
    """x (..., k) · Ŵᵀ, Ŵ = (code − zero)·scale from the route's stored form (see the module docstring)."""
    codes = stored_codes(qweight, bits, k, n, route).to(torch.float32)
    w = (codes - formats.int_format(bits).zero) * _expanded_scales(scales, k, group_size)
    return torch.nn.functional.linear(x.to(torch.float32), w)


@int_matmul.register_fake
def _(x, qweight, scales, bits, k, n, group_size, block, route):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def unpack_shape(bits: int, n: int, k: int) -> tuple[int, int, int]:
    """Shape in which packed codes are stored for in-graph unpacking: (n, groups, 1) bytes for 2/4 bits, (n, groups,
    3) for 3 bits (one 24-bit word per group), so that unpacking starts without a Reshape node."""
    per_group, n_bytes = formats.packing.group_shape(bits)
    return n, -(-k // per_group), n_bytes if n_bytes > 1 else 1


def _unpack_onnx(op, packed, bits: int, n: int, k: int):
    """Packed uint8 in `unpack_shape` → uint8 codes: (n, groups, codes per group) when they fill k exactly, else
    (n, k). BitShift/BitwiseAnd on uint8, or on uint32 words for 3 bits."""
    per_group, n_bytes = formats.packing.group_shape(bits)
    mask = (1 << bits) - 1
    if n_bytes == 1:
        shifts = _const(op, (np.arange(per_group) * bits).astype(np.uint8))
        codes = op.BitwiseAnd(op.BitShift(packed, shifts, direction="RIGHT"), _const(op, np.array(mask, np.uint8)))
    else:  # 3 bits: 8 codes in a 24-bit little-endian word of 3 bytes
        b = op.BitShift(op.Cast(packed, to=UINT32), _const(op, (np.arange(n_bytes) * 8).astype(np.uint32)),
                        direction="LEFT")
        parts = op.Split(b, axis=2, num_outputs=n_bytes)
        word = parts[0]
        for part in parts[1:]:
            word = op.BitwiseOr(word, part)
        shifts = _const(op, (np.arange(per_group) * bits).astype(np.uint32))
        codes = op.Cast(op.BitwiseAnd(op.BitShift(word, shifts, direction="RIGHT"),
                                      _const(op, np.array(mask, np.uint32))), to=UINT8)
    if k % per_group:
        codes = op.Slice(op.Reshape(codes, _ints(op, [n, -1])), _ints(op, [0]), _ints(op, [k]), _ints(op, [1]))
    return codes


def _pack4_onnx(op, codes, n: int, block: int):
    """uint8 4-bit codes (n, kp) → MatMulNBits' B (n, kp / block, block / 2): element 0 in the low nibble."""
    pairs = op.Split(op.Reshape(codes, _ints(op, [n, -1, 2])), axis=2, num_outputs=2)
    b = op.BitwiseOr(pairs[0], op.BitShift(pairs[1], _const(op, np.array(4, np.uint8)), direction="LEFT"))
    return op.Reshape(b, _ints(op, [n, -1, block // 2]))


def _block_scales(op, scales, n: int, groups: int, blocks: int, factor: float, transpose: bool):
    """float16 (n, groups) → float32 per block: (n · blocks,) for MatMulNBits, (blocks, n) for DequantizeLinear."""
    s = op.Cast(scales, to=FLOAT)
    if factor != 1.0:
        s = op.Mul(s, _const(op, np.array(factor, np.float32)))
    reps = blocks // groups
    if transpose:
        s = op.Transpose(s, perm=[1, 0])  # (groups, n)
        if reps > 1:
            s = op.Expand(op.Unsqueeze(s, _ints(op, [1])), _ints(op, [groups, reps, n]))
        return op.Reshape(s, _ints(op, [blocks, n]))
    if reps > 1:
        s = op.Expand(op.Unsqueeze(s, _ints(op, [2])), _ints(op, [n, groups, reps]))
    return op.Reshape(s, _ints(op, [-1]))


def _int_matmul_onnx(x, qweight, scales, bits: int, k: int, n: int, group_size: int, block: int, route: str):
    from onnxscript.values import Opset

    op = _op()
    groups = formats.num_groups(k, group_size)
    blocks = -(-k // block)
    kp = blocks * block
    widen = bits in (2, 3) and route != "nbits2"
    half = 0.5 if widen else 1.0
    if route in ("nbits", "nbits2"):
        msft = Opset("com.microsoft", 1)
        if widen:
            u = op.Gather(_const(op, widen_table(bits, signed=False)),
                          op.Cast(_unpack_onnx(op, qweight, bits, n, k), to=INT64))
            if kp != k:
                u = op.Pad(op.Reshape(u, _ints(op, [n, k])), _ints(op, [0, 0, 0, kp - k]),
                           _const(op, np.array(8, np.uint8)))
            b, nbits = _pack4_onnx(op, u, n, block), 4
        else:
            b, nbits = qweight, bits
        s = _block_scales(op, scales, n, groups, blocks, half, transpose=False)
        y = msft.MatMulNBits(x, b, s, K=k, N=n, bits=nbits, block_size=block)
        if route == "nbits2":  # MatMulNBits' zero point 2 = midrise 1.5 + 0.5: add 0.5·scale·Σ_group x
            lead = [0] * (len(x.shape) - 1)
            sums = op.ReduceSum(op.Reshape(x, _ints(op, lead + [groups, k // groups])), _ints(op, [-1]),
                                keepdims=0)
            half_s = op.Transpose(op.Mul(op.Cast(scales, to=FLOAT), _const(op, np.array(0.5, np.float32))),
                                  perm=[1, 0])
            y = op.Add(y, op.MatMul(sums, half_s))
        return y
    if route == "fold":
        w = op.Cast(qweight, to=FLOAT)
        if groups > 1:
            s = op.Unsqueeze(op.Cast(scales, to=FLOAT), _ints(op, [2]))
            w = op.Reshape(op.Mul(op.Reshape(w, _ints(op, [n, groups, k // groups])), s), _ints(op, [n, k]))
        else:
            w = op.Mul(w, op.Cast(scales, to=FLOAT))
        return op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    if bits == 4:
        w = Opset(INT4_MARKER[0], 1).Int4Bytes(qweight, shape=[k, n])
    elif bits == 8:
        w = qweight
    else:
        v = op.Gather(_const(op, widen_table(bits, signed=True)),
                      op.Cast(_unpack_onnx(op, qweight, bits, n, k), to=INT64))
        w = op.Cast(op.Transpose(op.Reshape(v, _ints(op, [n, k])), perm=[1, 0]), to=INT4)
    s = _block_scales(op, scales, n, groups, blocks, half, transpose=True)
    return op.MatMul(x, op.DequantizeLinear(w, s, axis=0, block_size=block))


# ----------------------------------------------------------------------------- E8 lattice codes


E8_ROUTES = ("nbits", "fold")


@torch.library.custom_op("lowbit_onnx::e8_matmul", mutates_args=())
def e8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, magnitudes: Tensor, signs: Tensor, offsets: Tensor,
              ball: Tensor | None, bits: int, k: int, n: int, block: int, route: str) -> Tensor:
    """x (..., k) · Ŵ'ᵀ, Ŵ' = scales ⊙ Σ_stage m·(digit − 7.5) with the digits of the E8 codes in `qweight` (the
    record's bytes as (n, k / 8, bits)) from the `e8p.digit_tables()` tables (see the module docstring)."""
    fmt = e8p.e8_format(bits)
    tables = e8p.DigitTables(magnitudes, signs, offsets, ball)
    digits = e8p.digits_from_bytes(qweight.reshape(n, -1), fmt, tables).to(torch.float32) - e8p.DIGIT_ZERO
    mult = torch.tensor(e8p.DIGIT_MULTIPLIERS[bits], dtype=torch.float32).view(-1, 1, 1)
    w = (digits * mult).sum(dim=0) * scales.to(torch.float32)
    return torch.nn.functional.linear(x.to(torch.float32), w)


@e8_matmul.register_fake
def _(x, qweight, scales, magnitudes, signs, offsets, ball, bits, k, n, block, route):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _e8_digits_onnx(op, qweight, magnitudes, signs, offsets, ball, bits: int):
    """The (n, k / 8, 8) int32 digits of each stage (e8p.digits_from_bytes in ONNX ops)."""
    nb = e8p.e8_format(bits).bytes_per_group
    parts = op.Split(qweight, axis=2, num_outputs=nb)
    idx = [op.Cast(op.Squeeze(p, _ints(op, [2])), to=INT64) for p in parts]  # (n, groups) each

    def e8p_digits(lo, hi):
        mag = op.Cast(op.Gather(magnitudes, hi), to=INT32)  # (n, groups, 8)
        sgn = op.Cast(op.Gather(signs, lo), to=INT32)
        off = op.Unsqueeze(op.Cast(op.Gather(offsets, lo), to=INT32), _ints(op, [2]))
        return op.Add(op.Mul(mag, sgn), off)

    d1 = e8p_digits(idx[0], idx[1])
    if bits == 2:
        return [d1]
    if bits == 3:
        v = op.Add(op.Mul(d1, _const(op, np.array(2, np.int32))), op.Cast(op.Gather(ball, idx[2]), to=INT32))
        first = op.Min(v, _const(op, np.array(15, np.int32)))
        return [first, op.Sub(v, first)]
    return [d1, e8p_digits(idx[2], idx[3])]


def _e8_matmul_onnx(x, qweight, scales, magnitudes, signs, offsets, ball, bits: int, k: int, n: int, block: int,
                    route: str):
    from onnxscript.values import Opset

    op = _op()
    stages = _e8_digits_onnx(op, qweight, magnitudes, signs, offsets, ball, bits)
    mults = e8p.DIGIT_MULTIPLIERS[bits]
    if route == "fold":  # a float weight, folded at load; standard ops only
        w = None
        for d, m in zip(stages, mults):
            t = op.Mul(op.Sub(op.Cast(d, to=FLOAT), _const(op, np.array(e8p.DIGIT_ZERO, np.float32))),
                       _const(op, np.array(m, np.float32)))
            w = t if w is None else op.Add(w, t)
        w = op.Mul(op.Reshape(w, _ints(op, [n, k])), op.Cast(scales, to=FLOAT))
        return op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    msft = Opset("com.microsoft", 1)
    blocks = -(-k // block)
    kp = blocks * block
    zero = op.Expand(_const(op, np.array(e8p.DIGIT_ZERO, np.float32)), _ints(op, [n * blocks]))
    y = None
    for d, m in zip(stages, mults):
        u = op.Cast(op.Reshape(d, _ints(op, [n, k])), to=UINT8)
        if kp != k:  # MatMulNBits reads K columns; the padding is never used
            u = op.Pad(u, _ints(op, [0, 0, 0, kp - k]), _const(op, np.array(8, np.uint8)))
        s = _block_scales(op, scales, n, 1, blocks, m, transpose=False)
        t = msft.MatMulNBits(x, _pack4_onnx(op, u, n, block), s, zero, K=k, N=n, bits=4, block_size=block)
        y = t if y is None else op.Add(y, t)
    return y


# ----------------------------------------------------------------------------- FP4


def act_thresholds(a_format: str) -> np.ndarray:
    """7 float32 thresholds t with quantize(q) = magnitude[Σ_i [q > t_i]] for q = |x| / scale: t_i is the midpoint
    between magnitudes i and i+1, or the float just below it when a tie there rounds up (to the even code)."""
    fmt = f4.fp4_format(a_format)
    mags = fmt.magnitudes().numpy().astype(np.float32)
    mids = ((mags[:-1].astype(np.float64) + mags[1:]) / 2).astype(np.float32)
    up = f4.quantize(torch.from_numpy(mids), fmt, 1.0).numpy() == mags[1:]
    return np.where(up, np.nextafter(mids, np.float32(0)), mids).astype(np.float32)


def _exp2(shift: Tensor) -> Tensor:
    return f4.exponent_multipliers(shift)


@torch.library.custom_op("lowbit_onnx::fp4_matmul", mutates_args=())
def fp4_matmul(x: Tensor, qweight: Tensor, w_scales: Tensor, w_shift: Tensor | None, act_shift: Tensor | None,
               act_scale: Tensor | None, k: int, n: int, w_format: str, a_format: str | None) -> Tensor:
    """Q_a(x ⊙ 2**act_shift) · (Ŵ' ⊙ 2**w_shift)ᵀ with FP4 codes (see the module docstring)."""
    from ..kernels.fp4_ops import dequantize_fp4_weight

    w = dequantize_fp4_weight(qweight.reshape(n, -1), w_scales, w_format, k)
    if w_shift is not None:
        w = w * _exp2(w_shift)
    h = quantize_fp4_activations(x.to(torch.float32), act_shift, act_scale, a_format)
    return torch.nn.functional.linear(h, w)


@fp4_matmul.register_fake
def _(x, qweight, w_scales, w_shift, act_shift, act_scale, k, n, w_format, a_format):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


def _pow2_onnx(op, shift):
    one = _const(op, np.array(1, np.uint32))
    return op.Cast(op.BitShift(one, op.Cast(shift, to=UINT32), direction="LEFT"), to=FLOAT)


def _fp4_matmul_onnx(x, qweight, w_scales, w_shift, act_shift, act_scale, k: int, n: int, w_format: str,
                     a_format: str | None):
    op = _op()
    codes = op.Cast(_unpack_onnx(op, qweight, 4, n, k), to=INT64)
    w = op.Reshape(op.Gather(_const(op, f4.fp4_format(w_format).grid(0.0).numpy()), codes), _ints(op, [n, k]))
    w = op.Mul(w, op.Cast(w_scales, to=FLOAT))
    if w_shift is not None:
        w = op.Mul(w, _pow2_onnx(op, w_shift))
    h = x
    if act_shift is not None:
        h = op.Mul(h, _pow2_onnx(op, act_shift))
    if a_format is not None:
        t = act_thresholds(a_format)
        s = op.Reshape(op.Cast(act_scale, to=FLOAT), _ints(op, []))
        q = op.Div(op.Abs(h), s)
        above = op.Cast(op.Greater(op.Unsqueeze(q, _ints(op, [-1])), _const(op, t)), to=INT32)
        code = op.ReduceSum(above, _ints(op, [-1]), keepdims=0)  # the magnitude code, 0..7
        mags = _const(op, f4.fp4_format(a_format).magnitudes().numpy())
        h = op.Mul(op.Mul(op.Gather(mags, code), s), op.Sign(h))
    return op.MatMul(h, op.Transpose(w, perm=[1, 0]))


TRANSLATIONS = {
    torch.ops.lowbit_onnx.rotate.default: _rotate_onnx,
    torch.ops.lowbit_onnx.int_matmul.default: _int_matmul_onnx,
    torch.ops.lowbit_onnx.fp4_matmul.default: _fp4_matmul_onnx,
    torch.ops.lowbit_onnx.e8_matmul.default: _e8_matmul_onnx,
}
