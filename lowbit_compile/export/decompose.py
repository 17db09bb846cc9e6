"""Decompose lowbit linears into ops the ExecuTorch runtime has, before torch.export.

`lowbit::rotated_linear` and `lowbit::fp4_linear` are Python ops: the ExecuTorch runtime has no kernel for them.
Each `LowbitLinear` is replaced by a module of plain ATen ops that computes the same y = sv ⊙ Tₘᵀ(Ŵ' · Tₙ(su ⊙ x)) + b,
each `LowbitFP4Linear` by one that computes the same y = Q_a(Tₙ(su ⊙ x) ⊙ 2**k) · Ŵ'ᵀ + b:

- `Int4DynamicLinear` (route "xnnpack-int4"): the 4-bit codes (minus 8: signed int4) and scales run on XNNPACK's
  int8 × int4 kernels with int8 per-token dynamic activation quantization; the file holds the codes as 4 bits.
  A layer with one scale per output channel is written as `quantized_decomposed.dequantize_per_channel` of int8
  codes in [-8, 7] with float32 scales: XNNPACK's qd8-f32-qc4w kernel, any even in_features. A grouped layer
  becomes a torchao `IntxUnpackedToInt8Tensor` weight: the qd8-f32-qb4w kernel (blocks of 32·k inputs, bfloat16 scales).
  (torchao's form of a per-channel weight also lands on qb4w, one block of in_features: ExecuTorch 1.5 maps every
  2-D int4 scale to it.) On an AVX2 CPU without VNNI, qc4w runs 1.3–2.2× faster than qb4w at the same shape
  (`python -m bench.xnnpack_int4`), so per-channel layers take the channelwise form.
- `Int4DynamicLinear` also takes 2/3-bit records: their zero point (2^b − 1)/2 is a half-integer, so the codes
  become the odd int4 values 2c − (2^b − 1) with half the scale, exactly the record's weight. Stored that way
  (route "xnnpack-int4" again, int4="xnnpack-wide") the file holds 4 bits per weight. Route "xnnpack-int4-load"
  (int4="xnnpack-load") keeps the file at 2/3 bits: XNNPACK's copy of those codes is left out of the file (tagged
  as external named data), and a second method, `LoadTimeWeights`, rebuilds exactly those bytes from the packed
  codes when the program is loaded (executorch.load_pte_method); forward then runs the int4 kernel as fast as
  4-bit layers. ExecuTorch 1.5's XNNPACK serializer has no 2-bit type (its XNNDatatype stops at qbint4/bf16,
  though the XNNPACK library inside the runtime has QC2W kernels), and a weight computed in the graph is
  re-packed by XNNPACK on every call (batch-1 bmm: 1.7× the time of the float linear at 16 tokens, before any
  unpacking), so widening once at load is the only way to both small files and fast forwards in this runtime.
  A 4-bit head tied to a quantized embedding takes that route too (int4="xnnpack-load"): its codes are the
  gather's table, which the file then holds once (executorch.py's docstring).
- `PackedLinear` (route "packed", any of 2/3/4/8 bits): the codes stay packed as in the record (uint8 buffers);
  the graph unpacks them with shifts and masks, applies the float16 scales and runs a float matmul on every
  forward. The file keeps the recipe's size and runs in any runtime without a loading step, but the unpacking
  runs on the runtime's portable kernels: several times slower than the float program.
- `FP4TableLinear` (route "fp4-a16" for W4A16, "fp4-a4" for W4A4): FP4 codes stay packed two per byte; the
  graph unpacks the nibbles, decodes them through the format's 16-entry value table times the float16 row
  scales and runs a float matmul. W4A4 layers also round their activations to the FP4 grid in the graph, bit
  for bit as `kernels.fp4_ops.quantize_fp4_activations` does; fp4-rot layers rotate their input first.

- E8 lattice codes (E8QuantizedLinear: w2/w3/w4-e8 and -ft), as 4-bit digits d = 2C + 7.5 of each E8 stage
  (formats/e8p.py: e8p.int4_digits; the graphs compute them from the code bytes through the 4.3 KB of int8 tables of
  e8p.digit_tables). `E8PackedLinear` (route "e8-packed", int4 "xnnpack" or "packed"): the code bytes stay in the
  file and are decoded on every forward (index_select gathers on the portable kernels) into the exact float weight,
  then a float matmul. `E8Int4Linear` (int4 "xnnpack-load": route "e8-xnnpack-int4-load", the file keeps the E8
  codes and `LoadTimeWeights` rebuilds XNNPACK's int4 weights from them at load; "xnnpack-wide": "e8-xnnpack-int4",
  4 bits per weight and stage in the file): one XNNPACK int4 product per stage on the codes d − 8 with scales m·s,
  and the rank-one term (Σ ½·m)·s_row·Σ_j x'_j in float for the difference between XNNPACK's zero 8 and the digits'
  7.5. Fine-tuned (-ft) sign vectors hold float16 values and are stored as float16.

The rotations Tₙ = F_K ⊗ H_P/√P are applied as a Kronecker product of small orthonormal blocks (`KronTransform`):
the dense factor F_K and Sylvester blocks H_p/√p with p ≤ MAX_BLOCK, one `linear` per block on a reshaped view
and a permute between blocks. XNNPACK delegates these ops with dynamic batch and sequence sizes (it does not
delegate slices of dynamic tensors, which narrow + cat butterflies need), and the blocks are small: at most
MAX_BLOCK² floats per Sylvester block and K²/8 bytes of sign bits for a large Paley factor, each stored once
per file (ExecuTorch deduplicates equal constants), where a dense n×n transform would outweigh the weights.
Matmuls with a weight computed in the graph are batch-1 bmm, which XNNPACK runs (`matmul_computed_weight`).

Why a module swap rather than a graph decomposition of the op: the XNNPACK pattern needs the int8 codes and
scales as constant parameters of the exported program, which a decomposition inside the graph cannot add.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import formats, hadamard
from ..errors import LowbitError
from ..formats import fp4 as f4
from ..kernels.specs import E8P_LINEAR
from ..nn import LowbitEmbedding, LowbitFP4Linear, LowbitLinear
from .embedding import GatherEmbedding

MAX_BLOCK = 64  # largest Sylvester block; a 64×64 float32 block is 16 KiB, stored once per size in the file

ROUTES = ("xnnpack-int4", "xnnpack-int4-load", "packed", "fp4-a16", "fp4-a4", "e8-packed", "e8-xnnpack-int4",
          "e8-xnnpack-int4-load")
# How integer layers are lowered (export_pte's `int4`): which of them take XNNPACK's int8 × int4 kernel, and where
# 2/3-bit codes are widened to its 4-bit layout (see route_for).
INT4_MODES = ("xnnpack", "xnnpack-load", "xnnpack-wide", "packed")


def kron_blocks(n: int, factor: torch.Tensor | None) -> list[torch.Tensor]:
    """Small orthonormal float32 blocks whose Kronecker product (first block = slowest index) is F ⊗ H_P/√P,
    the transform `hadamard.apply` computes on a last dimension of n."""
    if n <= MAX_BLOCK:  # one dense block is as small as any split
        return [hadamard.dense(n).to(torch.float32)]
    k = 1 if factor is None else factor.shape[0]
    p = n // k
    blocks = [] if factor is None else [factor.to(torch.float32)]
    log_p = p.bit_length() - 1
    n_chunks = -(-log_p // int(math.log2(MAX_BLOCK)))
    for i in range(n_chunks):  # split 2^log_p into near-equal powers of two
        e = log_p // n_chunks + (1 if i < log_p % n_chunks else 0)
        if e:
            blocks.append(hadamard.dense(1 << e).to(torch.float32))
    return blocks


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(…, n) → (tokens, n): every decomposed layer computes on one leading dimension.

    With dynamic batch and sequence sizes, XNNPACK takes a reshape only when at most one of its output
    dimensions is dynamic, given as -1 (a shape with symbolic sizes, as `view(*x.shape[:-1], n)` traces, is
    left to the runtime's portable kernel, and an unsqueeze with two dynamic dimensions fails to lower). On
    (tokens, n) every reshape, unsqueeze and matmul inside the layer has one dynamic dimension: the layer is one
    XNNPACK partition with the ops around it, and only the final `unflatten_tokens` runs outside. Fewer
    partitions and nodes make lowering much faster; the math per token is the same. The flattening is a view
    of a contiguous copy (as in matmul_computed_weight): a view of the input itself may be valid for the
    strides torch.export traced and not for those to_edge re-derives (after a transpose + reshape)."""
    if x.dim() == 2:
        return x
    return x.clone(memory_format=torch.contiguous_format).view(-1, x.shape[-1])


def unflatten_tokens(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(tokens, m) → (…, m) with the leading dimensions of the layer's input x."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _view_rows(t: torch.Tensor, like: torch.Tensor, last: int) -> torch.Tensor:
    """t viewed as `like`'s shape with the last dimension `last`: -1 for the first (the only dynamic)
    dimension, so XNNPACK takes the reshape (see flatten_tokens)."""
    return t.view(-1, *like.shape[1:-1], last) if like.dim() >= 2 else t.view(last)


def matmul_computed_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ wᵀ for a weight computed in the graph (unpacked codes, a rebuilt sign matrix), as one bmm of batch 1.

    XNNPACK delegates linears and mm with constant weights only, but bmm with any operands: as a bmm the matmul
    runs in XNNPACK and joins the partition of the activations around it (an mm would run in the runtime's
    portable kernel and split the partitions at every layer: more partitions make lowering slower and the
    program slower). Left to torch's decomposition of `linear`, an N-d input with a computed weight becomes
    expand(weight to every token) + bmm when the input is not contiguous, or a view whose strides to_edge may
    re-derive differently. An explicit contiguous copy of the activations (cheap next to the matmul) makes the
    flattening a valid view everywhere. The weight gets its batch dimension by a view and a transpose, ops
    XNNPACK takes (an unsqueeze of a leading dimension would run outside and cut the weight's decoding off the
    matmul's partition)."""
    x3 = x.clone(memory_format=torch.contiguous_format).view(1, -1, x.shape[-1])
    y = torch.bmm(x3, w.reshape(1, *w.shape).transpose(1, 2))
    return _view_rows(y, x, w.shape[0])


def _sign_bits(block: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(packed signs, magnitude) when every entry of the block is ±c (Hadamard factors), else None.

    The signs are packed 8 per byte along the last dimension, element 0 in the low bit."""
    c = block.abs().flatten()[0]
    if not bool((block.abs() == c).all()):
        return None
    bits = (block > 0).to(torch.uint8)
    pad = -bits.shape[1] % 8
    bits = nn.functional.pad(bits, (0, pad)).reshape(bits.shape[0], -1, 8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return packed, float(c)


class KronTransform(nn.Module):
    """x ↦ (A₁ ⊗ … ⊗ A_k) x on the last dimension, or its transpose (`transpose=True`, the inverse).

    On the view (…, d₁, …, d_k) each step applies one block to the last axis (a `linear`) and rotates the axes
    right by one (a `permute`); after k steps every axis has had its block and the order is restored.
    Blocks up to MAX_BLOCK are float32 constants (the linear is delegated to XNNPACK). A larger block (a Paley
    factor F_K, K up to 1024) is ±1/√K: it is stored as packed sign bits, K²/8 bytes instead of 4K², and
    rebuilt in the graph; a float F_344 and its transpose would outweigh a 4-layer model's 2-bit MLP codes. The
    inverse stores the signs of F_K too and rebuilds Fᵀ as a transposed view, so a model that applies both stores
    the bits once (ExecuTorch keeps one copy of equal constants).
    """

    def __init__(self, blocks: list[torch.Tensor], transpose: bool = False):
        super().__init__()
        self.dims = [b.shape[0] for b in blocks]
        self.n = math.prod(self.dims)
        self.transpose = transpose
        self.magnitudes: list[float | None] = []
        for i, b in enumerate(blocks):
            signs = _sign_bits(b) if b.shape[0] > MAX_BLOCK else None
            if signs is None:
                # linear(y, W) = y Wᵀ applies W to the last axis: W = A for the transform, Aᵀ for the inverse.
                self.register_buffer(f"block{i}", (b.t() if transpose else b).contiguous())
                self.magnitudes.append(None)
            else:
                self.register_buffer(f"block{i}_signs", signs[0])
                self.register_buffer(f"bit_shifts{i}", torch.arange(8, dtype=torch.uint8))
                self.magnitudes.append(signs[1])

    def block(self, i: int) -> torch.Tensor:
        c = self.magnitudes[i]
        if c is None:
            return getattr(self, f"block{i}")
        packed = getattr(self, f"block{i}_signs")
        bits = torch.bitwise_right_shift(packed.unsqueeze(-1), getattr(self, f"bit_shifts{i}")) & 1
        bits = bits.reshape(packed.shape[0], -1).narrow(1, 0, self.dims[i])
        a = bits.to(torch.float32) * (2 * c) - c  # exactly ±c
        return a.t() if self.transpose else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.dims)
        if k == 1:
            return self._apply(0, x)
        # On (tokens, d₁, …, d_k): one leading dimension, given as -1 in every reshape (see flatten_tokens).
        y = flatten_tokens(x).reshape(-1, *self.dims)
        rotate = [0, k] + list(range(1, k))
        for i in reversed(range(k)):
            y = self._apply(i, y).permute(rotate)
        # a view of a contiguous copy keeps the -1 (a reshape of the permuted tensor traces to symbolic sizes)
        return unflatten_tokens(y.clone(memory_format=torch.contiguous_format).view(-1, self.n), x)

    def _apply(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """Block i on the last axis: a delegated linear for a constant block, an mm for a rebuilt one."""
        if self.magnitudes[i] is None:
            return nn.functional.linear(y, getattr(self, f"block{i}"))
        return matmul_computed_weight(y, self.block(i))


def _compact_signs(v: torch.Tensor | None) -> torch.Tensor | None:
    """A ±1 sign vector as int8 (a quarter of the bytes; cast back in the graph), a vector of float16 values (E8
    records after block fine-tuning, quantize/finetune.py) as float16, any other vector as float32."""
    if v is None:
        return None
    if bool((v.abs() == 1).all()):
        return v.to(torch.int8)
    h = v.to(torch.float16)
    return h if torch.equal(h.to(v.dtype), v) else v.to(torch.float32).clone()


class _RotatedBase(nn.Module):
    """Shared rotation plumbing: su ⊙ x → Tₙ on the way in, Tₘᵀ → sv ⊙ on the way out."""

    def __init__(self, lin: LowbitLinear):
        super().__init__()
        self.fqn = lin.fqn
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.bits, self.group_size = lin.bits, getattr(lin, "group_size", 0)  # E8 records have no groups
        self.register_buffer("su", _compact_signs(lin.su))
        self.register_buffer("sv", _compact_signs(lin.sv))
        self.rot_in = None if lin.su is None else KronTransform(kron_blocks(lin.in_features, lin.had_in))
        self.rot_out = (None if lin.sv is None
                        else KronTransform(kron_blocks(lin.out_features, lin.had_out), transpose=True))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().to(torch.float32).clone())

    def _linear(self, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = flatten_tokens(x)
        if self.rot_in is not None:
            h = self.rot_in(h * self.su.to(torch.float32))
        if self.rot_out is None:  # the bias can ride along in the matmul
            return unflatten_tokens(self._linear(h, self.bias), x)
        y = self.rot_out(self._linear(h, None)) * self.sv.to(torch.float32)
        return unflatten_tokens(y if self.bias is None else y + self.bias, x)


def per_channel(lin: LowbitLinear) -> bool:
    """One scale per output channel (no groups, or one group of in_features): XNNPACK's channelwise int4 kernel."""
    return lin.group_size in (0, lin.in_features)


def int4_weight(lin: LowbitLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): the record's weight as signed int4 codes (int8 in [-8, 7], (out, in)) times float32 scales
    ((out, groups)), equal to the record's (c − zero)·s. Grouped scales are rounded to bfloat16, as XNNPACK's
    blockwise kernel stores them; per-channel scales stay float32 (its channelwise kernel's), exactly the record's.

    4 bits: c − 8 and s. 2/3 bits: the zero point (2^b − 1)/2 is a half-integer, so 2c − (2^b − 1) (odd, within
    ±7) and s/2; halving is exact and commutes with the bfloat16 rounding."""
    if lin.bits not in (2, 3, 4):
        raise LowbitError(f"layer {lin.fqn}: XNNPACK's int4 kernel takes 2/3/4-bit codes, not {lin.bits}-bit")
    twice_zero = int(2 * formats.int_format(lin.bits).zero)
    codes = formats.unpack(lin.qweight, lin.bits, lin.in_features).to(torch.int16)
    scales = lin.scales.to(torch.float32)
    if twice_zero % 2:
        codes, scales = 2 * codes - twice_zero, scales / 2
    else:
        codes = codes - twice_zero // 2
    scales = scales.reshape(lin.out_features, -1)
    if per_channel(lin):
        return codes.to(torch.int8), scales
    # XNNPACK stores int4 block scales as bfloat16 (relative rounding <= 2^-9); round here too, so that the module's
    # eager forward is a faithful simulation of the kernel (int8 activations, bf16 scales).
    return codes.to(torch.int8), scales.to(torch.bfloat16).to(torch.float32)


class Int4DynamicLinear(_RotatedBase):
    """2/3/4-bit codes with int8 dynamic activations on XNNPACK's 4-bit kernels: per-channel codes as int8 in
    [-8, 7] dequantized per channel (qd8-f32-qc4w), grouped codes as a torchao IntxUnpackedToInt8Tensor
    (qd8-f32-qb4w). `at_load`: XNNPACK's weight is rebuilt when the program is loaded (route xnnpack-int4-load):
    the record's packed codes and scales, as the record stores them, stay on the module for LoadTimeWeights."""

    def __init__(self, lin: LowbitLinear, at_load: bool = False):
        super().__init__(lin)
        self.route = "xnnpack-int4-load" if at_load else "xnnpack-int4"
        self.per_channel = per_channel(lin)
        codes, scales = int4_weight(lin)
        if self.per_channel:
            self.register_buffer("codes", codes)
            self.register_buffer("channel_scales", scales.reshape(-1).contiguous())
            # XNNPACK's int4 weights are symmetric: the zero points are part of the pattern, not of the file
            self.register_buffer("zero_points", torch.zeros(lin.out_features, dtype=torch.int64))
        else:
            from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
                IntxUnpackedToInt8Tensor,
                IntxUnpackedToInt8TensorActivationQuantization,
            )

            weight = IntxUnpackedToInt8Tensor(
                codes, scales, torch.zeros(scales.shape, dtype=torch.int8), torch.int4,
                (1, lin.group_size), torch.float32, IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
            self.weight = nn.Parameter(weight, requires_grad=False)
        # Plain attributes, not buffers: forward does not use them, so they stay out of its program.
        self.int4_codes = codes
        self.packed_codes = lin.qweight.clone() if at_load else None
        self.record_scales = lin.scales.clone() if at_load else None

    def _linear(self, h, bias):
        if not self.per_channel:
            return nn.functional.linear(h, self.weight, bias)
        return channelwise_int4_linear(h, self.codes, self.channel_scales, self.zero_points, bias)


def channelwise_int4_linear(h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """XNNPACK's qd8-f32-qc4w pattern: h (tokens, in) quantized per token to asymmetric int8, times int4 codes
    ((out, in) int8 in [-8, 7]) dequantized per channel with float32 scales (out,) (zero_points: (out,) int64 zeros,
    part of the pattern, not of the file). In PyTorch these ops compute exactly what the kernel does, so a module's
    eager forward is its simulation."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    qd = torch.ops.quantized_decomposed
    s, z = qd.choose_qparams_per_token_asymmetric(h, torch.int8)
    hq = qd.quantize_per_token(h, s, z, -128, 127, torch.int8)
    h = qd.dequantize_per_token(hq, s, z, -128, 127, torch.int8, torch.float32)
    w = qd.dequantize_per_channel(codes, scales, zero_points, 0, -8, 7, torch.int8)
    return nn.functional.linear(h, w, bias)


def unpack_in_graph(q: torch.Tensor, bits: int, n: int, shifts: torch.Tensor) -> torch.Tensor:
    """(rows, n) integer codes from the packed bytes q (formats.pack's layout), in ops the runtime has: shifts by
    `shifts` (arange(codes per group)·bits; uint8 for 2/4 bits, int32 for 3) and masks. `>>` would trace to
    aten.__rshift__, which the runtime lacks."""
    rows = q.shape[0]
    if bits == 8:
        return q
    mask = (1 << bits) - 1
    if bits != 3:  # 2 and 4 bits: whole codes inside one byte
        c = torch.bitwise_right_shift(q.unsqueeze(-1), shifts) & mask
    else:  # 8 codes in a little-endian 24-bit word
        b = q.reshape(rows, -1, 3).to(torch.int32)
        word = b.narrow(-1, 0, 1) + b.narrow(-1, 1, 1) * 256 + b.narrow(-1, 2, 1) * 65536
        c = torch.bitwise_right_shift(word, shifts) & mask
    c = c.reshape(rows, -1)
    return c if c.shape[1] == n else c.narrow(1, 0, n)


def _shifts(bits: int) -> torch.Tensor:
    per_group, n_bytes = formats.packing.group_shape(bits)
    return torch.arange(per_group, dtype=torch.uint8 if n_bytes == 1 else torch.int32) * bits


class LoadTimeWeights(nn.Module):
    """The program's `lowbit_weights` method: the int4 weights of the xnnpack-int4-load layers, rebuilt from their
    records' packed codes and scales; the loader (executorch.load_pte_method) runs it once and hands the outputs to
    forward's XNNPACK delegate as its external named data.

    Outputs, per layer: the codes in XNNPACK's 4-bit layout, (out, in/2) uint8 with two codes per byte offset by 8,
    code 2j in the low nibble (NodeVisitor.convert_to_qc4w; `in` is a multiple of 8 on this route, so no row is
    padded), and the scales: float32 (out,) for a per-channel layer, bfloat16 (out, groups) for a grouped one. These
    are the bytes XNNPACK's serializer would have put in the file.
    2/3-bit codes c become 2c − (2^b − 1) + 8 (shifts, masks and integer adds on the runtime's portable kernels,
    about 12 ns per weight here); 4-bit codes c (zero point 8) are already that layout: the record's packed bytes,
    copied. Scales: the record's (float16) through float32, halved for 2/3 bits (exact), rounded to bfloat16 for a
    grouped layer, as int4_weight does. The method's inputs are the record's own bytes, so where forward holds the
    same bytes (the packed table of a tied embedding's gather) ExecuTorch stores them once for both methods (its
    emitter keeps one copy of equal constants across a program): the file holds the table once and the head still
    runs on XNNPACK.
    E8 layers (E8Int4Linear) give one (codes, scales) pair per E8 stage: the digits d (d − 8 + 8 = d as nibbles),
    computed from the E8 code bytes through the digit tables, and float32 scales m·s. The code bytes of all E8
    layers of a width are one buffer decoded by one set of ops and cut into layers (narrow), so the method's program
    does not grow with the layer count (decoding layer by layer made MiniLM's w2-e8 file 2.32 bits per weight, this
    2.24).
    Every constant is a tensor (a buffer): scalar operands become lifted tensor constants, and ExecuTorch's edge
    passes mix up their names once a program has ten of them."""

    def __init__(self, layers: list[Int4DynamicLinear | E8Int4Linear]):
        super().__init__()
        self.layers = [(m.fqn, m.bits, m.in_features) for m in layers]
        self.per_channel = [m.per_channel for m in layers]
        self.e8 = [isinstance(m, E8Int4Linear) for m in layers]
        self.e8_groups: dict[int, tuple[int, int]] = {}  # E8 layer i -> (first group, groups) in e8_codes{bits}
        e8_codes: dict[int, list[torch.Tensor]] = {}
        for i, m in enumerate(layers):
            if self.e8[i]:
                # E8 codes of one width are decoded together (one set of ops for all layers: the method's program
                # is part of the file), then cut into layers
                parts = e8_codes.setdefault(m.bits, [])
                self.e8_groups[i] = (sum(p.shape[0] for p in parts), m.packed_codes.numel() // m.bits)
                parts.append(m.packed_codes.reshape(-1, m.bits))
            else:
                self.register_buffer(f"qweight{i}", m.packed_codes)
            self.register_buffer(f"scales{i}", m.record_scales)
        u8, i32 = torch.uint8, torch.int32
        if e8_codes:
            self._register_e8_tables(sorted(e8_codes))
            for bits, parts in e8_codes.items():
                self.register_buffer(f"e8_codes{bits}", torch.cat(parts).contiguous())
        for bits in sorted({m.bits for m, e8 in zip(layers, self.e8) if not e8} - {4}):
            self.register_buffer(f"shifts{bits}", _shifts(bits))
            self.register_buffer(f"mask{bits}", torch.tensor([(1 << bits) - 1], dtype=u8 if bits == 2 else i32))
            self.register_buffer(f"offset{bits}", torch.tensor([9 - (1 << bits)], dtype=u8))  # 8 − (2^b − 1)
        self.register_buffer("byte_values", torch.tensor([256, 65536], dtype=i32))  # 3 bits: a 24-bit word
        self.register_buffer("two", torch.tensor([2], dtype=u8))
        self.register_buffer("sixteen", torch.tensor([16], dtype=u8))
        self.register_buffer("one_half", torch.tensor([0.5], dtype=torch.float32))
        # what forward's weights hold (an E8 layer: one per stage): the lowering tags them
        self.int4_codes = [c for m in layers for c in (m.int4_codes if isinstance(m.int4_codes, list) else
                                                       [m.int4_codes])]

    def codes(self, i: int) -> torch.Tensor:
        """(out, in) codes of a 2/3-bit layer i (formats.unpack: code j in bits [j·b, (j+1)·b) of its group)."""
        q, (_, bits, _) = getattr(self, f"qweight{i}"), self.layers[i]
        if bits == 2:
            c = torch.bitwise_right_shift(q.unsqueeze(-1), self.shifts2)
        else:
            b = q.reshape(q.shape[0], -1, 3).to(torch.int32)
            high = b.narrow(-1, 1, 2) * self.byte_values
            word = b.narrow(-1, 0, 1) + high.narrow(-1, 0, 1) + high.narrow(-1, 1, 1)
            c = torch.bitwise_right_shift(word, self.shifts3)
        return (c & getattr(self, f"mask{bits}")).reshape(q.shape[0], -1).to(torch.uint8)

    def int4_bytes(self, i: int) -> torch.Tensor:
        """Layer i's codes in XNNPACK's layout: two per byte, each + 8 (signed int4 → unsigned nibble)."""
        q, (_, bits, _) = getattr(self, f"qweight{i}"), self.layers[i]
        if bits == 4:  # codes 0..15 with zero point 8, element 0 in the low nibble: XNNPACK's bytes already
            return q.clone()
        nib = self.codes(i) * self.two + getattr(self, f"offset{bits}")  # 2c − (2^b − 1) + 8
        pairs = nib.reshape(nib.shape[0], -1, 2)
        return (pairs.narrow(-1, 0, 1) + pairs.narrow(-1, 1, 1) * self.sixteen).reshape(nib.shape[0], -1)

    def xnnpack_scales(self, i: int) -> torch.Tensor:
        """Layer i's scales as int4_weight gives them to XNNPACK: float32, halved for 2/3 bits; a grouped layer's
        then rounded to bfloat16."""
        s, (_, bits, _) = getattr(self, f"scales{i}").to(torch.float32), self.layers[i]
        s = s if bits == 4 else s * self.one_half
        return s.reshape(-1) if self.per_channel[i] else s.to(torch.bfloat16).reshape(s.shape[0], -1)

    def _register_e8_tables(self, bits: list[int]) -> None:
        from ..formats import e8p

        t = e8p.digit_tables()
        self.register_buffer("e8_magnitudes", t.magnitudes.clone())
        self.register_buffer("e8_signs", t.signs.clone())
        self.register_buffer("e8_offsets", t.offsets.clone())
        if 3 in bits:
            self.register_buffer("e8_ball", t.ball.clone())
        self.register_buffer("fifteen", torch.tensor([15], dtype=torch.int32))
        self.register_buffer("two_i32", torch.tensor([2], dtype=torch.int32))
        for b in bits:
            mults = torch.tensor(e8p.DIGIT_MULTIPLIERS[b], dtype=torch.float32).reshape(-1, 1)
            self.register_buffer(f"e8_mults{b}", mults)

    def e8_nibbles(self, bits: int) -> list[torch.Tensor]:
        """Every E8 layer's digits of width `bits`, per stage, as XNNPACK nibbles: (groups, 4) uint8, the digit d of
        weight 2j in the low nibble of byte j (d − 8 as signed int4, + 8: d itself). The digits come from the
        code bytes through the digit tables (e8p.digits_from_bytes)."""
        b = getattr(self, f"e8_codes{bits}")

        def byte(j):
            return b.narrow(1, j, 1).reshape(-1).to(torch.int64)

        def digits(lo, hi):
            mag = self.e8_magnitudes.index_select(0, hi).to(torch.int32)
            return mag * self.e8_signs.index_select(0, lo).to(torch.int32) + \
                self.e8_offsets.index_select(0, lo).to(torch.int32).unsqueeze(-1)

        d1 = digits(byte(0), byte(1))
        if bits == 2:
            stages = [d1]
        elif bits == 3:
            v = d1 * self.two_i32 + self.e8_ball.index_select(0, byte(2)).to(torch.int32)
            first = torch.minimum(v, self.fifteen)
            stages = [first, v - first]
        else:
            stages = [d1, digits(byte(2), byte(3))]
        out = []
        for d in stages:
            pairs = d.to(torch.uint8).reshape(-1, 4, 2)
            out.append((pairs.narrow(-1, 0, 1) + pairs.narrow(-1, 1, 1) * self.sixteen).reshape(-1, 4))
        return out

    def e8_outputs(self, i: int, nibbles: list[torch.Tensor]) -> list[torch.Tensor]:
        """E8 layer i's XNNPACK weights, per stage: its rows of `nibbles` (e8_nibbles), (out, in/2), and the float32
        channel scales m·s (E8Int4Linear)."""
        s, (_, bits, k) = getattr(self, f"scales{i}").to(torch.float32), self.layers[i]
        scales = getattr(self, f"e8_mults{bits}") * s.reshape(1, -1)  # (stages, out): exact (powers of two)
        first, n = self.e8_groups[i]
        out = []
        for stage, nib in enumerate(nibbles):
            out += [nib.narrow(0, first, n).reshape(-1, k // 2), scales.narrow(0, stage, 1).reshape(-1)]
        return out

    def forward(self) -> tuple[torch.Tensor, ...]:
        """(codes of layer 0, scales of layer 0, codes of layer 1, …); an E8 layer gives one pair per stage."""
        nibbles = {bits: self.e8_nibbles(bits) for bits in sorted({b for (_, b, _), e8 in zip(self.layers, self.e8)
                                                                   if e8})}
        out = []
        for i, (_, bits, _) in enumerate(self.layers):
            out += self.e8_outputs(i, nibbles[bits]) if self.e8[i] else [self.int4_bytes(i), self.xnnpack_scales(i)]
        return tuple(out)


class PackedLinear(_RotatedBase):
    """Codes stay packed in uint8 buffers; the graph unpacks them (unpack_in_graph) and runs a float matmul."""

    route = "packed"

    def __init__(self, lin: LowbitLinear):
        super().__init__(lin)
        self.register_buffer("qweight", lin.qweight.clone())
        self.register_buffer("scales", lin.scales.clone())  # float16 in the file, float32 in the graph
        self.register_buffer("shifts", _shifts(lin.bits))
        self.zero = formats.int_format(lin.bits).zero

    def codes(self) -> torch.Tensor:
        """(out, in) integer codes, the exact inverse of formats.pack, in ops the runtime has."""
        return unpack_in_graph(self.qweight, self.bits, self.in_features, self.shifts)

    def dequantized(self) -> torch.Tensor:
        w = self.codes().to(torch.float32) - self.zero
        s = self.scales.to(torch.float32)
        if self.group_size == 0:
            return w * s
        rows = w.shape[0]
        return (w.reshape(rows, -1, self.group_size) * s.unsqueeze(-1)).reshape(rows, self.in_features)

    def _linear(self, h, bias):
        y = matmul_computed_weight(h, self.dequantized())
        return y if bias is None else y + bias


class E8PackedLinear(_RotatedBase):
    """An E8 lattice-code linear (E8QuantizedLinear, `lowbit::e8p_linear`) in ops the runtime has (route "e8-packed").

    The record's code bytes stay in the file (2, 3 or 4 bytes per 8 weights, uint8 (out, in / 8, bytes)) with its
    float16 row scales and the 4.3 KB of int8 digit tables of e8p.digit_tables (one copy per file: ExecuTorch keeps
    one copy of equal constants). The graph decodes the codes on every forward: per E8P stage two `index_select`
    gathers (magnitudes by the code's high byte, signs and offsets by its low byte), a product and a sum give the
    4-bit digits d = 2C + 7.5; the weight is Σ_stage m·(d − 7.5) times the row scale (e8p.DIGIT_MULTIPLIERS; at 3
    bits 0.25·(2d₁ + ball[c₂] − 15)): exact small dyadic numbers, so the float32 weight equals the reference's. Then
    a float matmul, and the record's rotations as for integer layers (su / sv int8 ±1, float16 after fine-tuning).
    Like the packed integer route, the decoding runs on the portable kernels on every forward."""

    route = "e8-packed"

    def __init__(self, lin: LowbitLinear):
        from ..formats import e8p

        super().__init__(lin)
        fmt = e8p.e8_format(lin.bits)
        t = e8p.digit_tables()
        self.register_buffer("qweight", lin.qweight.reshape(lin.out_features, -1, fmt.bytes_per_group).clone())
        self.register_buffer("scales", lin.scales.clone())  # float16 (out, 1) in the file, float32 in the graph
        self.register_buffer("magnitudes", t.magnitudes.clone())
        self.register_buffer("signs", t.signs.clone())
        self.register_buffer("offsets", t.offsets.clone())
        self.register_buffer("ball", t.ball.clone() if lin.bits == 3 else None)

    def _byte(self, j: int) -> torch.Tensor:
        return self.qweight.narrow(2, j, 1).reshape(-1).to(torch.int64)

    def _digits(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(out·in/8, 8) float32 digits 2C + 7.5 of the E8P codes with bytes lo, hi."""
        mag = self.magnitudes.index_select(0, hi).to(torch.float32)
        sign = self.signs.index_select(0, lo).to(torch.float32)
        return mag * sign + self.offsets.index_select(0, lo).to(torch.float32).unsqueeze(-1)

    def dequantized(self) -> torch.Tensor:
        d1 = self._digits(self._byte(0), self._byte(1))
        if self.bits == 2:
            w = (d1 - 7.5) * 0.5
        elif self.bits == 3:
            w = (d1 * 2.0 + self.ball.index_select(0, self._byte(2)).to(torch.float32) - 15.0) * 0.25
        else:
            w = (d1 - 7.5) * 0.5 + (self._digits(self._byte(2), self._byte(3)) - 7.5) * 0.125
        return w.reshape(self.out_features, self.in_features) * self.scales.to(torch.float32)

    def _linear(self, h, bias):
        y = matmul_computed_weight(h, self.dequantized())
        return y if bias is None else y + bias


class E8Int4Linear(_RotatedBase):
    """An E8 lattice-code linear on XNNPACK's int8 × int4 channelwise kernel (qd8-f32-qc4w), one int4 product per
    E8 stage (e8p.int4_digits: digits d in [0, 15] with zero 7.5 and row scale m·s, the stages' products summed).

    XNNPACK's int4 weights are symmetric around 8, the digits' zero is 7.5: (d − 7.5)·m·s = (d − 8)·m·s + ½·m·s, so
    each stage runs the int4 codes d − 8 with float32 scales m·s, and the ½·m·s parts of all stages are one rank-one
    term added in float: (Σ_stage ½·m)·s_row · Σ_j x'_j of the rotated input x' (a linear with a row of ones,
    delegated; the float16 row scales, shared with the weights method's input). Exact in float; the int4 product
    rounds the activations to int8 per token as on route xnnpack-int4.

    `at_load` (route e8-xnnpack-int4-load, int4="xnnpack-load"): the int4 codes and scales are left out of the file
    and rebuilt at load by LoadTimeWeights from the record's E8 code bytes (the digit tables, e8p.digit_tables): the
    file holds the E8 codes. Otherwise (route e8-xnnpack-int4, int4="xnnpack-wide") the file holds 4 bits per
    weight and stage."""

    per_channel = True

    def __init__(self, lin: LowbitLinear, at_load: bool = False):
        from ..formats import e8p

        super().__init__(lin)
        self.route = "e8-xnnpack-int4-load" if at_load else "e8-xnnpack-int4"
        fmt = e8p.e8_format(lin.bits)
        codes = e8p.unpack_codes(lin.qweight, fmt)
        digits = e8p.int4_digits(codes, fmt).to(torch.int8) - 8  # (stages, out, in) in [-8, 7]
        mults = e8p.DIGIT_MULTIPLIERS[lin.bits]
        self.stages = fmt.stages
        for k in range(self.stages):
            self.register_buffer(f"codes{k}", digits[k].contiguous())
            self.register_buffer(f"channel_scales{k}", (mults[k] * lin.scales.to(torch.float32)).reshape(-1))
        self.register_buffer("zero_points", torch.zeros(lin.out_features, dtype=torch.int64))
        self.register_buffer("row_scales", lin.scales.clone())  # float16 (out, 1): the rank-one term's
        self.register_buffer("ones", torch.ones(1, lin.in_features))
        self.half_sum = 0.5 * sum(mults)
        self.int4_codes = [digits[k] for k in range(self.stages)]  # what forward's weights hold: the lowering tags them
        self.packed_codes = lin.qweight.clone() if at_load else None
        self.record_scales = lin.scales.clone() if at_load else None

    def _linear(self, h, bias):
        y = None
        for k in range(self.stages):
            t = channelwise_int4_linear(h, getattr(self, f"codes{k}"), getattr(self, f"channel_scales{k}"),
                                        self.zero_points)
            y = t if y is None else y + t
        # float32 × the float16 scales (promoted exactly): a cast of the constant would be folded into a float32 copy
        correction = (nn.functional.linear(h, self.ones) * self.half_sum) * self.row_scales.view(1, -1)
        y = y + correction
        return y if bias is None else y + bias


def fp4_rounding_steps(fmt: f4.FP4Format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Round-to-nearest on the bias-0 magnitudes g₀ < … < g₇ of `fmt` as a count of midpoints passed.

    q rounds to Σᵢ (gᵢ₊₁ − gᵢ)·[q passes mᵢ], mᵢ = (gᵢ + gᵢ₊₁)/2, where q passes mᵢ when q > mᵢ if a tie goes
    down (gᵢ₊₁ has an odd code) and when q ≥ mᵢ if it goes up (even code): ties to the even code, saturating
    at g₇, as `formats.fp4.encode`. With σᵢ = +1 (down) or −1 (up), [q > mᵢ] = ceil(clamp(q − mᵢ, 0, 1)) and
    [q ≥ mᵢ] = 1 − ceil(clamp(mᵢ − q, 0, 1)): exact, since the sign of a float difference is always right.

    Returns (σ, σ·m, w, base) with the magnitude = base + Σᵢ wᵢ·ceil(clamp(σᵢ·q − σᵢ·mᵢ, 0, 1)), wᵢ = σᵢ·stepᵢ,
    base = Σ steps of the tie-up midpoints. Every term is a short binary fraction: the sum is exact in any order.
    """
    g = fmt.magnitudes().to(torch.float64)
    mids, steps = (g[:-1] + g[1:]) / 2, g[1:] - g[:-1]
    sigma = torch.where(torch.arange(1, len(g)) % 2 == 0, -1.0, 1.0).to(torch.float64)  # even upper code: -1
    f32 = torch.float32
    return sigma.to(f32), (sigma * mids).to(f32), (sigma * steps).to(f32), float(steps[sigma < 0].sum())


class FP4TableLinear(nn.Module):
    """An FP4 linear (`lowbit::fp4_linear`, after `lowbit::hadamard` for fp4-rot) in ops the runtime has.

    Weights: the uint8 bytes of the record stay in the file (two codes per byte, element 0 in the low nibble);
    the graph splits them with a shift and a mask, looks the 16 codes up in the format's value table at bias 0
    (`FP4Format.grid`, 64 bytes, shared by every layer of a format) and multiplies by the float16 row scales:
    `formats.fp4.decode`, exact. Then a float matmul.

    Activations (W4A4): as `kernels.fp4_ops.quantize_fp4_activations`: x·2**k (k the uint8 per-channel
    exponents, through a power-of-two table: exact), q = |x| / s with the per-tensor scale s, q to the nearest
    bias-0 magnitude (ties to the even code, saturating), the value ±magnitude·s. The reference finds the
    magnitude from float bit fields; the runtime has no bit views of floats, so this counts the midpoints q
    passes (`fp4_rounding_steps`) with sub, clamp, ceil and a 1×7 linear: ops XNNPACK takes, so the rounding
    joins the partition around it (comparisons and sums would run in portable kernels and split it). Given the
    same x both give the same value bit for bit.

    Rotation (fp4-rot): the input is su ⊙ x through the Kronecker blocks of the integer route (`KronTransform`).
    """

    def __init__(self, lin: LowbitFP4Linear):
        super().__init__()
        self.fqn = lin.fqn
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.w_format, self.a_format = lin.w_format, lin.a_format
        self.route = "fp4-a16" if lin.a_format is None else "fp4-a4"
        self.register_buffer("qweight", lin.qweight.clone())
        self.register_buffer("w_scales", lin.w_scales.clone())  # float16 in the file, float32 in the graph
        self.register_buffer("table", f4.fp4_format(lin.w_format).grid(0.0))
        self.register_buffer("nibble_shifts", torch.tensor([0, 4], dtype=torch.uint8))
        self.register_buffer("act_shift", None if lin.act_shift is None else lin.act_shift.clone())
        self.register_buffer("pow2", None if lin.act_shift is None else torch.exp2(torch.arange(16.0)))
        if lin.a_format is not None:
            if lin.act_scale is None:
                raise LowbitError(f"layer {lin.fqn}: activation format {lin.a_format!r} without an act_scale; "
                                  f"the record is damaged: re-run quantization")
            fmt = f4.fp4_format(lin.a_format)
            sigma, sigma_mids, steps, self.base = fp4_rounding_steps(fmt)
            self.register_buffer("act_scale", lin.act_scale.clone())
            self.register_buffer("sigma", sigma)
            self.register_buffer("sigma_mids", sigma_mids)
            self.register_buffer("steps", steps.reshape(1, -1))
            # |x|·sign_gain >= 1 wherever the magnitude is not 0 (q > m₀): clamp(x·sign_gain, -1, 1) is x's sign
            first_mid = float(fmt.magnitudes()[1]) / 2
            self.sign_gain = 2.0 / (first_mid * float(lin.act_scale.float().reshape(())))
        rotated = lin.su is not None
        self.register_buffer("su", _compact_signs(lin.su))
        self.rot_in = KronTransform(kron_blocks(lin.in_features, lin.had_in)) if rotated else None
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().to(torch.float32).clone())

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 FP4 codes, the exact inverse of formats.fp4.pack_codes."""
        q = self.qweight
        c = (torch.bitwise_right_shift(q.unsqueeze(-1), self.nibble_shifts) & 15).reshape(q.shape[0], -1)
        return c if c.shape[1] == self.in_features else c.narrow(1, 0, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """Ŵ' float32 (out, in): table[code] · row scale."""
        codes = self.codes()
        values = self.table.index_select(0, codes.reshape(-1).to(torch.int64)).view(codes.shape)
        return values * self.w_scales.to(torch.float32)

    def quantize_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_shift is not None:
            x = x * self.pow2.index_select(0, self.act_shift.to(torch.int64))
        if self.a_format is None:
            return x
        s = self.act_scale.to(torch.float32)
        q = x.abs() / s
        passed = torch.ceil(torch.clamp(q.unsqueeze(-1) * self.sigma - self.sigma_mids, 0.0, 1.0))
        mag = _view_rows(nn.functional.linear(passed, self.steps), q, q.shape[-1]) + self.base
        return mag * torch.clamp(x * self.sign_gain, -1.0, 1.0) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = flatten_tokens(x)  # (tokens, in): the W4A4 rounding's unsqueeze needs one dynamic dimension
        if self.rot_in is not None:
            h = self.rot_in(h * self.su.to(torch.float32))
        y = matmul_computed_weight(self.quantize_activations(h), self.dequantized())
        return unflatten_tokens(y if self.bias is None else y + self.bias, x)


def route_for(lin: LowbitLinear, int4: str = "xnnpack", tied: bool = False) -> str:
    """Which runtime form an integer layer gets (export_pte's `int4`):

    "xnnpack": 4-bit layers on XNNPACK's int4 kernel (xnnpack-int4), 2/3-bit layers packed (the file keeps their
        size, a plain runtime runs it, the unpacking runs on every forward);
    "xnnpack-load": 2/3-bit layers on the int4 kernel too, their codes widened when the program is loaded
        (xnnpack-int4-load: the file keeps 2/3 bits; load it with executorch.load_pte_method), and so is a `tied`
        4-bit layer (a head whose codes are its embedding's packed table, which the program holds for the gather
        anyway): its XNNPACK weight is rebuilt at load from that table, so the file holds the table once;
    "xnnpack-wide": 2/3-bit layers on the int4 kernel with their codes widened in the file (xnnpack-int4: 4 bits
        per weight on disk, a plain runtime runs it);
    "packed": every layer packed (exact float math: tells a kernel problem from a decomposition problem).
    (E8 layers are not routed here: decompose_lowbit_linears gives them e8-packed, or E8Int4Linear with
    "xnnpack-load" and "xnnpack-wide".)
    XNNPACK's blockwise kernel takes groups of 32·k inputs, its channelwise kernel an even in_features (on the load
    route a multiple of 8, so that packed codes fill whole rows); other layers stay packed. With an odd
    in_features, ExecuTorch 1.5.1's qc4w program computes rows 2 and 3 of a 2- or 3-token batch wrong (error
    of the order of the outputs; export verification refuses such files), so odd widths stay packed."""
    if int4 not in INT4_MODES:
        raise LowbitError(f"int4={int4!r}: valid choices are 'xnnpack' (XNNPACK's dynamic-int8 × int4 kernel for "
                          f"4-bit layers), 'xnnpack-load' (and for 2/3-bit layers and tied heads, their weights "
                          f"rebuilt at load), 'xnnpack-wide' (and for 2/3-bit layers, widened in the file) and "
                          f"'packed' (unpack in the graph, float matmul)")
    fits = lin.in_features % 2 == 0 if per_channel(lin) else lin.group_size % 32 == 0
    if int4 == "packed" or lin.bits not in (2, 3, 4) or not fits:
        return "packed"
    if int4 == "xnnpack-load" and (lin.bits != 4 or tied) and lin.in_features % 8 == 0:
        return "xnnpack-int4-load"
    if lin.bits == 4 or int4 == "xnnpack-wide":
        return "xnnpack-int4"
    return "packed"


def decompose_lowbit_linears(model: nn.Module, int4: str = "xnnpack") -> dict[str, str]:
    """Replace every LowbitLinear (integer or E8) and LowbitFP4Linear of `model` (in place) by its runtime form, and
    every LowbitEmbedding by a GatherEmbedding (route "gather": packed rows gathered and decoded in portable integer
    ops); returns {fqn: route}. A LowbitLinear that reads an embedding's very codes (swap_linears gives a tied head the
    embedding's tensors) is `tied` for route_for."""
    tables = [m.qweight for m in model.modules() if isinstance(m, LowbitEmbedding)]
    routes = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowbitEmbedding):
            new = GatherEmbedding(mod)
            route = new.route
        elif isinstance(mod, LowbitFP4Linear):
            new = FP4TableLinear(mod)
            route = new.route
        elif isinstance(mod, LowbitLinear) and mod.op == E8P_LINEAR:  # a deep copy holds a copy of the spec
            new = (E8Int4Linear(mod, at_load=int4 == "xnnpack-load") if int4 in ("xnnpack-load", "xnnpack-wide")
                   else E8PackedLinear(mod))
            route = new.route
        elif isinstance(mod, LowbitLinear):
            route = route_for(mod, int4, tied=any(mod.qweight is t for t in tables))
            new = (PackedLinear(mod) if route == "packed"
                   else Int4DynamicLinear(mod, at_load=route == "xnnpack-int4-load"))
        else:
            continue
        new.fqn = name  # where it sits: a tied head's record is named after its embedding
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        routes[name] = route
    return routes


def load_time_weights(model: nn.Module) -> LoadTimeWeights | None:
    """The `lowbit_weights` method for the xnnpack-int4-load layers of a decomposed model (None if it has none)."""
    layers = [m for m in model.modules() if isinstance(m, (Int4DynamicLinear, E8Int4Linear))
              and m.route in ("xnnpack-int4-load", "e8-xnnpack-int4-load")]
    return LoadTimeWeights(layers) if layers else None
