"""The integer lowbit linears on the native CPU kernels: `lowbit::native_linear`, chosen at rewrite time
(cpu_caps.choose) where bfloat16 is not fast.

The record's codes are repacked once into the native layout (kernels/native: 2/3/4 bits per weight as stored,
rows padded to 128 codes) with float32 scales; the grid's zero ((2^b − 1)/2 at 2/3 bits, 8 at 4) is the kernel's.
What is packed comes from `record.native_digits()`: E8 records give their codes as 4-bit digits with zero 7.5
(formats/e8p.int4_digits), the 3/4-bit residual formats as two blocks of rows whose products are summed before
the output rotation (two 4-bit passes in one kernel call: 8 bits per weight read at run time).
The whole layer is one native call, `lowbit_native::rotated_linear`:

    y = sv ⊙ Tₘᵀ(native(Tₙ(su ⊙ x))) + bias

with the randomized Hadamard transforms Tₙ = F_K ⊗ H_P/√P run natively (`lowbit_native::hadamard`: a fast
Walsh–Hadamard transform for H_P and a small dense product for the factor F_K, the first of
`cpu.rotation_blocks(n)` when n is not a power of two; the Sylvester blocks that follow it are H_P's, which the
transform applies without reading them). At one row (decode) the per-call cost of separate rotation ops matched the
rotations' own: on the 8-layer Llama of bench.e2e (w4, head w4, one thread) one call per layer took a decode step
from 15.1 ms (float32 Kronecker matmuls) and 13.8 ms (three native calls) to 12.3 ms.

native(): rows below the kernel's prefill threshold quantize the (rotated) activations to int8 per block of 32
and sum code × int8 products exactly in int32 (error: the activation rounding, about 0.5 % of an output's size on
Gaussian data; tests/kernels/test_cpu_native.py); from the threshold on (prompts), tiles of weight rows are decoded
to float32 and multiplied by the float32 GEMM, so the prefill result is the reference's up to float32 rounding.

Under torch.compile the op is decomposed (`cpu.decompose_under_compile`): Inductor sees the one
`lowbit_native::rotated_linear` extern call, with the casts and reshapes around it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LowbitError
from . import cpu, native
from .reference import linear_fake

RUNTIME_NAME = "native"
ACT = "int8"  # the decode activations: int8 per block of 32 (kernels/native)


@dataclass
class NativePack:
    """A record's weights in the native kernels' form: what `lowbit::native_linear` takes."""

    packed: Tensor  # uint8 (out_features, Kp·bits/8), kernels/native layout
    scales: Tensor  # float32 (out_features, groups)
    bits: int
    zero: float
    in_features: int
    out_features: int
    source: str = ""  # the record's format when its codes were rewritten as digits (E8: "e8p2")

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 4

    def bits_per_weight(self) -> float:
        """Bits per weight as held in memory (codes padded to 128 per row + float32 scales)."""
        return 8 * self.nbytes() / (self.in_features * self.out_features)

    def describe(self) -> str:
        isa = native.capabilities()["selected"]
        digits = f" digits of {self.source}" if self.source else ""
        return (f"{RUNTIME_NAME} int{self.bits}{digits} ({isa}, {ACT} activations) {self.bits_per_weight():.2f} b/w "
                f"in memory")


def pack_native(rec) -> NativePack:
    """A record's codes in the native layout, from `rec.native_digits()`: (codes, bits, zero, scales) with
    codes of 2, 3 or 4 bits, one row per output or `stages` blocks of rows whose products add up (E8 records:
    E8QuantizedLinear.native_digits)."""
    codes, bits, zero, scales = rec.native_digits()
    if bits not in (2, 3, 4):
        raise LowbitError(f"layer {rec.fqn}: int{bits} has no native kernel")
    return NativePack(native.pack(codes.contiguous(), bits), scales.contiguous(), bits, zero, rec.in_features,
                      rec.out_features, "" if getattr(rec, "kind", "int") == "int" else rec.fmt)


_PACKED: dict[int, tuple] = {}  # id(record) -> (weakref to it, its NativePack)


def packed_for(rec) -> NativePack:
    """`pack_native(rec)`, once per record object (a recompile for a new shape reuses it)."""
    hit = _PACKED.get(id(rec))
    if hit is not None and hit[0]() is rec:
        return hit[1]
    w = pack_native(rec)
    key = id(rec)
    _PACKED[key] = (weakref.ref(rec, lambda _: _PACKED.pop(key, None)), w)
    return w


def factor_block(blocks, n: int) -> Tensor | None:
    """The dense factor F_K among cpu.rotation_blocks(n): the first block when its size is not a power of two (K
    from a Paley construction or a random factor, see hadamard.plan), else None. The other blocks are the Sylvester
    blocks H/√p that rotation_blocks splits H_P into, which the native transform applies as its fast Walsh–Hadamard
    transform without reading them. No blocks (no rotation): None."""
    if not blocks:
        return None
    sizes = [b.shape[0] for b in blocks]
    if math.prod(sizes) != n or any(s & (s - 1) for s in sizes[1:]):
        raise LowbitError(f"native_linear: rotation blocks of sizes {sizes} are not cpu.rotation_blocks({n})")
    return blocks[0] if sizes[0] & (sizes[0] - 1) else None


def native_linear_impl(x, packed, scales, su, sv, rot_in, rot_out, bias, bits, zero, in_features, out_features):
    lead = x.shape[:-1]
    h = x.reshape(-1, in_features).to(torch.float32)
    stages = packed.shape[0] // out_features
    if stages == 1:
        y = torch.ops.lowbit_native.rotated_linear(
            h, packed, scales, bits, zero, out_features, in_features, su, factor_block(rot_in, in_features), sv,
            factor_block(rot_out, out_features), None if bias is None else bias.to(torch.float32), ACT, -1, "auto")
    else:  # row blocks summed before the output rotation (E8 residual formats: kernels/e8_ops.py)
        y = torch.ops.lowbit_native.rotated_linear(
            h, packed, scales, bits, zero, stages * out_features, in_features, su, factor_block(rot_in, in_features),
            None, None, None, ACT, -1, "auto").view(-1, stages, out_features).sum(1)
        if sv is not None:
            y = torch.ops.lowbit_native.hadamard(y, sv, factor_block(rot_out, out_features), True, "auto")
        if bias is not None:
            y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, out_features)


@torch.library.custom_op("lowbit::native_linear", mutates_args=())
def native_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    su: Tensor | None,
    sv: Tensor | None,
    rot_in: list[Tensor],
    rot_out: list[Tensor],
    bias: Tensor | None,
    bits: int,
    zero: float,
    in_features: int,
    out_features: int,
) -> Tensor:
    """y = sv ⊙ Tₘᵀ(Ŵ' · Tₙ(su ⊙ x)) + bias on the native kernels; Ŵ'[n, k] = (code − zero)·scales[n, group] as
    packed by `pack_native`; Tₙ / Tₘ the Kronecker products of `rot_in` / `rot_out` (cpu.rotation_blocks; empty
    when su / sv is None), applied by lowbit_native::rotated_linear (factor_block). `packed` may hold a multiple
    of out_features rows, `stages` blocks whose weights add up: Ŵ' = Σ_s Ŵ'_s (E8 residual formats)."""
    return native_linear_impl(x, packed, scales, su, sv, rot_in, rot_out, bias, bits, zero, in_features,
                              out_features)


@native_linear.register_fake
def _(x, packed, scales, su, sv, rot_in, rot_out, bias, bits, zero, in_features, out_features):
    return linear_fake("native_linear", x, in_features, out_features)


def dequantize(packed: Tensor, scales: Tensor, bits: int, zero: float, in_features: int, out_features: int) -> Tensor:
    """The float32 weight (out_features, in_features) the kernel applies (row blocks of several stages summed)."""
    rows = packed.shape[0]
    codes = native.unpack(packed, bits, rows, in_features).to(torch.float32)
    groups = scales.shape[1]
    w = (codes - zero).view(rows, groups, in_features // groups) * scales.unsqueeze(-1)
    return w.reshape(-1, out_features, in_features).sum(0)


def _setup(ctx, inputs, output):
    x, packed, scales, su, sv, rot_in, rot_out, bias, bits, zero, in_features, out_features = inputs
    ctx.save_for_backward(packed, scales, su, sv, *rot_in, *rot_out)
    ctx.meta = (len(rot_in), bits, zero, in_features, out_features, bias is not None, x.dtype)


def _backward(ctx, grad):
    packed, scales, su, sv, *blocks = ctx.saved_tensors
    n_in, bits, zero, in_features, out_features, has_bias, dtype = ctx.meta
    rot_in, rot_out = blocks[:n_in], blocks[n_in:]
    g = grad.reshape(-1, out_features).to(torch.float32)
    g_bias = g.sum(0) if has_bias else None
    if sv is not None:  # y = sv ⊙ Tᵀ z  ->  dz = T (sv ⊙ dy)
        g = torch.ops.lowbit_native.hadamard(g, sv, factor_block(rot_out, out_features), False, "auto")
    g = g @ dequantize(packed, scales, bits, zero, in_features, out_features)
    if su is not None:  # h = T (su ⊙ x)  ->  dx = su ⊙ Tᵀ dh
        g = torch.ops.lowbit_native.hadamard(g, su, factor_block(rot_in, in_features), True, "auto")
    g = g.to(dtype).reshape(grad.shape[:-1] + (in_features,))
    return g, None, None, None, None, [None] * len(rot_in), [None] * len(rot_out), g_bias, None, None, None, None


native_linear.register_autograd(_backward, setup_context=_setup)
cpu.decompose_under_compile(native_linear, native_linear_impl)


def op_args(w: NativePack, su: Tensor | None, sv: Tensor | None, bias: Tensor | None):
    """Everything but x for `lowbit::native_linear`, in order."""
    rot_in = list(cpu.rotation_blocks(w.in_features)) if su is not None else []
    rot_out = list(cpu.rotation_blocks(w.out_features)) if sv is not None else []
    return (w.packed, w.scales, su, sv, rot_in, rot_out, bias, w.bits, w.zero, w.in_features, w.out_features)
