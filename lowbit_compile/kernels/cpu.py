"""CPU fast path of the integer lowbit linears: `lowbit::int4pack_linear`, chosen at rewrite time.

PyTorch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, bfloat16 activations, AVX2/AVX512) computes
x · Wᵀ with W[n, k] = (q[n, k] − 8) · scale[g, n] + zero[g, n] for 4-bit codes q and groups g of 32–256 inputs.
Our integer grids map onto it exactly (codes are widened once, when the layer is packed):

- 4-bit midtread, (c − 8)·s:                 q = c,              scale s
- 3-bit midrise,  (c − 3.5)·s = (2c − 7)·s/2: q = 2c + 1 ∈ [1, 15], scale s/2
- 2-bit midrise,  (c − 1.5)·s = (2c − 3)·s/2: q = 2c + 5 ∈ [5, 11], scale s/2

zero = 0 throughout. So 2/3-bit checkpoints stay 2/3-bit on disk and take 4 bits per weight in memory. The
float16 scales become bfloat16 (relative rounding ≤ 2⁻⁹), per-row scales are repeated over kernel groups, the
input dimension is padded to a multiple of 32 and the output dimension to a multiple of 64 (padded codes are 8,
i.e. weight 0). The randomized Hadamard transforms run as a Kronecker product of small orthonormal blocks (the
dense factor F_K, as ±1 int8 when larger than MAX_BLOCK, and Sylvester blocks of at most MAX_BLOCK), one matmul
per block, in float32.

    y = sv ⊙ Tₘᵀ(int4mm(bf16(Tₙ(su ⊙ x)))) + bias        (rows < DEQUANT_MIN_ROWS: decode)
    y = sv ⊙ Tₘᵀ(bf16(Tₙ(su ⊙ x)) · bf16(Ŵ)ᵀ) + bias     (prefill: weights decoded once per call; with one
                                                        scale per row the GEMM takes the exact codes q − 8 and
                                                        the scale multiplies its float32 output)

For many rows (prefill) the int4 kernel costs about one single-row call per row; decoding the packed weight once
into bfloat16 and running a bfloat16 GEMM is faster there. Numerics: activations rounded to bfloat16 (relative
2⁻⁹), scales to bfloat16, outputs of the matmul to bfloat16; accumulation in float32. See
tests/kernels/test_cpu_fast.py for the tolerance against the reference op.

Under torch.compile the op is decomposed into its ATen ops before Inductor (as `torch.library.triton_op` does),
so Inductor fuses the casts, sign flips and bias into the matmuls around the extern int4 kernel; eagerly and
under torch.export it stays one opaque op.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import formats, hadamard
from ..errors import LowbitError
from . import cpu_caps
from .int4pack_layout import packed_block_n, unpack_codes_t
from .reference import linear_fake

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
K_ALIGN = 32  # input features are padded to a multiple of this (the smallest kernel group)
N_ALIGN = 64  # output features are padded to whole kernel blocks (64 on AVX512, 32 on AVX2)
MAX_BLOCK = 128  # largest Sylvester block of the Kronecker rotation (one float32 matmul per block)
DEQUANT_MIN_ROWS = 256  # with fast bfloat16: from this many rows on, decode once per call into a bfloat16 GEMM
DEQUANT_TILE_BYTES = 4 << 20  # decoded weight tile (bfloat16) per GEMM call on that path
RUNTIME_NAME = "int4pack"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- packing (once, at rewrite time)


def unsupported_reason(rec) -> str | None:
    """Why a record cannot take the int4pack path (None: it can). `rec` is a QuantizedLinear."""
    if rec.bits not in (2, 3, 4):
        return f"int{rec.bits} has no int4pack form"
    if rec.qweight.device.type != "cpu":
        return f"weights on {rec.qweight.device.type}"
    if rec.group_size and rec.group_size % K_ALIGN:
        return f"group size {rec.group_size} is not a multiple of {K_ALIGN}"
    if packed_block_n() is None:
        return "this CPU's int4pack weight layout is not one we can decode"
    return None


@dataclass
class Int4Pack:
    """A record's weights in the int4 kernel's form: what `lowbit::int4pack_linear` takes."""

    packed: Tensor  # uint8 (n_pad, k_pad / 2), _convert_weight_to_int4pack_for_cpu layout
    scales_zeros: Tensor  # bfloat16 (k_pad / group_size, n_pad, 2): scale, zero (= 0)
    group_size: int  # the kernel's group size (32..256), or 0: one scale per row, repeated over kernel groups
    in_features: int
    out_features: int
    source_bits: int  # the record's width (2, 3 or 4): codes were widened to 4 bits
    # From how many rows on the op decodes the weight once per call and runs a GEMM, and whether in bfloat16 (else
    # float32): decided by what this CPU has (cpu_caps) when the layer is packed, and passed to the op as arguments,
    # so a compiled graph (and Inductor's caches, keyed by the graph) carries the choice it was made with.
    prefill_rows: int = DEQUANT_MIN_ROWS
    prefill_bf16: bool = True

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def bits_per_weight(self) -> float:
        """Bits per weight as held in memory (packed codes + bf16 scales/zeros), padding included."""
        return 8 * self.nbytes() / (self.in_features * self.out_features)

    def describe(self) -> str:
        widened = "" if self.source_bits == 4 else f", int{self.source_bits} widened"
        return f"{RUNTIME_NAME} {self.bits_per_weight():.2f} b/w in memory{widened}"


_PACKED: dict[int, tuple] = {}  # id(record) -> (weakref to it, its Int4Pack)


def packed_for(rec) -> Int4Pack:
    """`pack_int4(rec)`, packed once per record object (a recompile for a new shape reuses it)."""
    hit = _PACKED.get(id(rec))
    if hit is not None and hit[0]() is rec:
        return hit[1]
    w = pack_int4(rec)
    key = id(rec)
    _PACKED[key] = (weakref.ref(rec, lambda _: _PACKED.pop(key, None)), w)
    return w


def pack_int4(rec) -> Int4Pack:
    """Widen a 2/3/4-bit QuantizedLinear's codes into the int4 kernel's layout (see the module docstring)."""
    reason = unsupported_reason(rec)
    if reason is not None:
        raise LowbitError(f"layer {rec.fqn}: no int4pack form ({reason}); use the reference op (kernels='reference')")
    n, k, g0 = rec.out_features, rec.in_features, rec.group_size
    k_pad = k if g0 else _round_up(k, K_ALIGN)
    n_pad = _round_up(n, N_ALIGN)
    g = next(s for s in KERNEL_GROUP_SIZES if (g0 or k_pad) % s == 0)  # each kernel group inside a record group
    codes = formats.unpack(rec.qweight, rec.bits, k).to(torch.int32)
    scales = rec.scales.to(torch.float32)
    if rec.bits < 4:  # (c − (2^b − 1)/2)·s = (2c − (2^b − 1))·s/2 = (q − 8)·s/2
        codes = 2 * codes + (8 - ((1 << rec.bits) - 1))
        scales = scales / 2
    q = torch.full((n_pad, k_pad), 8, dtype=torch.int32)  # code 8: weight 0 in the padding
    q[:n, :k] = codes
    per_group = scales.repeat_interleave(g0 // g, dim=1) if g0 else scales.expand(n, k_pad // g)
    s = torch.ones(n_pad, k_pad // g)
    s[:n] = per_group
    scales_zeros = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return Int4Pack(packed, scales_zeros, g if g0 else 0, k, n, rec.bits, *prefill_choice())


def prefill_choice() -> tuple[int, bool]:
    """(prefill_rows, prefill_bf16) for this CPU: see Int4Pack."""
    return dequant_min_rows(), cpu_caps.prefill_dtype() == torch.bfloat16


@functools.cache
def _sylvester_block(size: int) -> Tensor:
    return hadamard.dense(size).to(torch.float32)


@functools.cache
def rotation_blocks(n: int) -> tuple[Tensor, ...]:
    """Small orthonormal float32 blocks whose Kronecker product (first block = slowest index) is the transform
    `hadamard.apply` computes on a last dimension of n: F_K ⊗ H_P/√P, H_P split into Sylvester blocks of at most
    MAX_BLOCK. A factor F_K larger than MAX_BLOCK (e.g. the 500×500 of a 32000-wide head) is kept as its ±1 signs,
    int8, and kron_apply divides by √K: 1 byte instead of 4 per entry. Cached per size: layers of one size share
    the same constant tensors."""
    p = hadamard.plan(n)
    f = hadamard.factor(n)
    blocks = []
    if f is not None:  # a large factor is kept as its ±1 signs (int8, a quarter of the bytes); kron_apply scales
        big = f.shape[0] > MAX_BLOCK
        blocks.append((torch.round(f.double() * math.sqrt(f.shape[0])).to(torch.int8) if big
                       else f.to(torch.float32)).contiguous())
    log_p = p.pow2.bit_length() - 1
    chunks = -(-log_p // int(math.log2(MAX_BLOCK))) if log_p else 0
    for i in range(chunks):  # near-equal powers of two
        e = log_p // chunks + (1 if i < log_p % chunks else 0)
        blocks.append(_sylvester_block(1 << e))
    return tuple(blocks)


# ----------------------------------------------------------------------------- the computation


def kron_apply(x: Tensor, blocks: list[Tensor], transpose: bool = False) -> Tensor:
    """(B₁ ⊗ … ⊗ Bⱼ) x on the last dimension of a 2-D x (rows, n), or (…)ᵀ x with transpose: one matmul per
    block, from the fastest index (a plain 2-D matmul) to the slowest (batched over rows, 2-D for one row). An
    int8 block holds the ±1 entries of a Hadamard factor H, and stands for H/√size."""
    rows, n = x.shape
    y, post = x, 1
    for i in range(len(blocks) - 1, -1, -1):
        b = blocks[i].t() if transpose else blocks[i]
        size = b.shape[0]
        signs = b.dtype == torch.int8  # a Hadamard factor kept as ±1: H/√size
        if signs:
            b = b.to(x.dtype)
        if post == 1:
            y = y.reshape(-1, size) @ b.t()
        elif i == 0 and rows == 1:
            y = b @ y.reshape(size, post)
        else:
            y = torch.matmul(b, y.reshape(-1, size, post))
        if signs:
            y = y * (1.0 / math.sqrt(size))
        post *= size
    return y.reshape(rows, n)


def kernel_group(packed: Tensor, scales_zeros: Tensor, group_size: int) -> int:
    """The group size the int4 kernel runs with: group_size, or for 0 (one scale per row) the repeat of it."""
    return group_size or packed.shape[1] * 2 // scales_zeros.shape[0]


def signed_codes_t(packed: Tensor, cols: tuple[int, int]) -> Tensor:
    """Codes q − 8 of output columns [start, stop) (whole kernel blocks), transposed: int8 (k_pad, stop − start),
    in byte-wide passes; the caller converts (exactly) to a float type."""
    start, stop = cols
    return unpack_codes_t(packed[start:stop], packed_block_n()).view(torch.int8) - 8


def dequantize_t(packed: Tensor, scales_zeros: Tensor, group_size: int, dtype: torch.dtype,
                 cols: tuple[int, int] | None = None) -> Tensor:
    """The packed weight decoded and transposed, (k_pad, n_pad) in `dtype`; only output columns [start, stop)
    with `cols` (whole kernel blocks). (q − 8)·s is exact in bfloat16 before the one rounding of the product."""
    group_size = kernel_group(packed, scales_zeros, group_size)
    block_n = packed_block_n()
    start, stop = cols or (0, packed.shape[0])
    codes = unpack_codes_t(packed[start:stop], block_n)
    k_pad, n = codes.shape
    s = scales_zeros[:, start:stop, 0].unsqueeze(1)
    z = scales_zeros[:, start:stop, 1].unsqueeze(1)
    w = codes.view(k_pad // group_size, group_size, n).to(dtype)
    w = (w - 8) * s.to(dtype) + z.to(dtype)
    return w.view(k_pad, n)


def dequant_tiles(n_pad: int, k_pad: int) -> list[tuple[int, int]]:
    """Output-column tiles whose bfloat16 weight stays under DEQUANT_TILE_BYTES: reused from the allocator's heap
    instead of freshly mapped (page faults of a new 32 MB buffer cost as much as the GEMM here), and in cache
    between decode and GEMM."""
    tile = max(N_ALIGN, DEQUANT_TILE_BYTES // (2 * k_pad) // N_ALIGN * N_ALIGN)
    return [(c, min(c + tile, n_pad)) for c in range(0, n_pad, tile)]


def dequant_min_rows() -> int:
    """From this many rows on, decode the weights once per call and run a GEMM (in cpu_caps.prefill_dtype()): 256
    where bfloat16 is fast; 8 where the GEMM is float32 (the int4 kernel's bfloat16 rows are slow there)."""
    return DEQUANT_MIN_ROWS if cpu_caps.prefill_dtype() == torch.bfloat16 else 8


def _matmul_dequantized(h: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    """h (rows, k_pad) bfloat16 or float32 times the decoded weight in h's dtype, tile by tile, float32 (rows,
    n_pad). Per-row scales (group_size 0): the GEMM runs on the exact codes q − 8 and the scale multiplies its
    output; per group: on (q − 8)·s rounded to h's dtype."""
    n_pad, k_pad = packed.shape[0], packed.shape[1] * 2
    if group_size:
        outs = [(h @ dequantize_t(packed, scales_zeros, group_size, h.dtype, c)).to(torch.float32)
                for c in dequant_tiles(n_pad, k_pad)]
    else:
        s = scales_zeros[0, :, 0].to(torch.float32)
        outs = [(h @ signed_codes_t(packed, c).to(h.dtype)).to(torch.float32) * s[c[0]:c[1]]
                for c in dequant_tiles(n_pad, k_pad)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def int4pack_linear_impl(x, packed, scales_zeros, su, sv, rot_in, rot_out, bias, in_features, out_features,
                         group_size, prefill_rows, prefill_bf16):
    lead = x.shape[:-1]
    h = x.reshape(-1, in_features).to(torch.float32)
    if su is not None:
        h = kron_apply(h * su, rot_in)
    k_pad = packed.shape[1] * 2
    if k_pad != in_features:
        h = torch.nn.functional.pad(h, (0, k_pad - in_features))
    if h.shape[0] >= prefill_rows:
        y = _matmul_dequantized(h.to(torch.bfloat16 if prefill_bf16 else torch.float32), packed, scales_zeros,
                                group_size)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), packed,
                                                       kernel_group(packed, scales_zeros, group_size), scales_zeros)
    y = y[:, :out_features].to(torch.float32)
    if sv is not None:
        y = kron_apply(y, rot_out, transpose=True) * sv
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, out_features)


@torch.library.custom_op("lowbit::int4pack_linear", mutates_args=())
def int4pack_linear(
    x: Tensor,
    packed: Tensor,
    scales_zeros: Tensor,
    su: Tensor | None,
    sv: Tensor | None,
    rot_in: list[Tensor],
    rot_out: list[Tensor],
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    group_size: int,
    prefill_rows: int,
    prefill_bf16: bool,
) -> Tensor:
    """y = sv ⊙ Tₘᵀ(Ŵ' · Tₙ(su ⊙ x)) + bias on the CPU int4 kernel; Ŵ' as packed by `pack_int4`, Tₙ / Tₘ the
    Kronecker products of `rot_in` / `rot_out` (from `rotation_blocks`; empty when su / sv is None); group_size
    the kernel's group size, or 0 for one scale per row; from prefill_rows rows on, a decoded GEMM in bfloat16
    (prefill_bf16) or float32."""
    return int4pack_linear_impl(x, packed, scales_zeros, su, sv, rot_in, rot_out, bias, in_features,
                                out_features, group_size, prefill_rows, prefill_bf16)


@int4pack_linear.register_fake
def _(x, packed, scales_zeros, su, sv, rot_in, rot_out, bias, in_features, out_features, group_size, prefill_rows,
      prefill_bf16):
    return linear_fake("int4pack_linear", x, in_features, out_features)


def decompose_under_compile(op, impl) -> None:
    """Inside AOTAutograd (torch.compile) trace `impl`, the op's body, so Inductor sees and fuses its ATen ops
    around the extern kernel; like torch.library.triton_op, keep the op whole when torch.export asks for it."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    def dispatch(mode, op_, types, args, kwargs):
        if custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op_, types, args, kwargs)
        with mode:
            return impl(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, dispatch)


decompose_under_compile(int4pack_linear, int4pack_linear_impl)


# Autograd: gradients reach the activations (and bias); the packed weights are frozen constants.


def _setup(ctx, inputs, output):
    x, packed, scales_zeros, su, sv, rot_in, rot_out, bias, in_features, out_features, group_size, *_ = inputs
    ctx.save_for_backward(packed, scales_zeros, su, sv, *rot_in, *rot_out)
    ctx.meta = (len(rot_in), in_features, out_features, group_size, bias is not None, x.dtype)


def _backward(ctx, grad):
    packed, scales_zeros, su, sv, *blocks = ctx.saved_tensors
    n_in, in_features, out_features, group_size, has_bias, dtype = ctx.meta
    rot_in, rot_out = blocks[:n_in], blocks[n_in:]
    g = grad.reshape(-1, out_features).to(torch.float32)
    g_bias = g.sum(0) if has_bias else None
    if sv is not None:  # y = sv ⊙ Tᵀ z  ->  dz = T (sv ⊙ dy)
        g = kron_apply(g * sv, rot_out)
    w_t = dequantize_t(packed, scales_zeros, group_size, torch.float32)  # (k_pad, n_pad)
    g = g @ w_t[:in_features, :out_features].t()
    if su is not None:  # h = T (su ⊙ x)  ->  dx = su ⊙ Tᵀ dh
        g = kron_apply(g, rot_in, transpose=True) * su
    g = g.to(dtype).reshape(grad.shape[:-1] + (in_features,))
    return g, None, None, None, None, [None] * len(rot_in), [None] * len(rot_out), g_bias, None, None, None, None, None


int4pack_linear.register_autograd(_backward, setup_context=_setup)


def op_args(w: Int4Pack, su: Tensor | None, sv: Tensor | None, bias: Tensor | None):
    """Everything but x for `lowbit::int4pack_linear`, in order."""
    rot_in = list(rotation_blocks(w.in_features)) if su is not None else []
    rot_out = list(rotation_blocks(w.out_features)) if sv is not None else []
    return (w.packed, w.scales_zeros, su, sv, rot_in, rot_out, bias, w.in_features, w.out_features, w.group_size,
            w.prefill_rows, w.prefill_bf16)
