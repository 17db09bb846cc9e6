"""CPU fast path of the FP4 linears: `lowbit::fp4pack_linear`, on the same int4 kernel as the integer layers.

Every FP4 value at exponent bias 0 is an integer multiple of c = 2**(1 - M) (M mantissa bits), so an FP4 weight
row is (integer code values) · c · row scale:

- E1M2: magnitudes {0, 0.5, …, 3.5} = c·{0, …, 7}, c = 1/2: one int4 code per weight, q = 8 ± I ∈ [1, 15].
- E2M1: {0, 1, 2, 3, 4, 6, 8, 12}, c = 1; E3M0: {0, 2, 4, …, 128} = 2·{0, 1, 2, 4, …, 64}, c = 2. These integers
  exceed int4, so each is split exactly into two int4 digits I = a·B + b (|a|, |b| ≤ 7; B = 8 for E2M1, 9 for
  E3M0; `split_table`). The two digit matrices are stacked as 2N rows of one int4 weight, run in one kernel call,
  and the two halves of the output are added: y = y_a·B + y_b (the kernel's scales c·B and c do the weighting).

    y = row_scale ⊙ int4mm(bf16(x ⊙ 2**k), digits)                          (W4A16)
    y = (row_scale · s_a) ⊙ int4mm(bf16(Q_a(x ⊙ 2**k) / s_a), digits)      (W4A4, s_a the activation scale)

The row scales (float16 in the record) and the activation scale are applied to the float32 output: the kernel
only ever sees exact small integers as weights. W4A4 activations are rounded to the FP4 grid in float32 exactly as
the reference does (`formats.fp4.quantize`) and passed unscaled: a bias-0 FP4 value has at most 4 significant bits,
exact in bfloat16, so the products inside the kernel are exact and the only roundings are float32 accumulation and
the kernel's bfloat16 output. W4A16 activations are rounded to bfloat16 (relative 2⁻⁹), as on the integer path.
fp4-rot layers rotate their input inside the op with the Kronecker blocks of `cpu.rotation_blocks`.

Memory: 4 bits per weight for E1M2, 8 for E2M1/E3M0 (two digits), plus bfloat16 kernel scales; the checkpoint and
the exported files keep 4-bit codes. Prefill (many rows) decodes the digits once per call into a bfloat16 weight
(exact: the bias-0 values) and runs a bfloat16 GEMM, as `cpu.int4pack_linear` does; on a CPU without fast
bfloat16 (cpu_caps.prefill_dtype) the weight and the GEMM are float32, from cpu.dequant_min_rows() rows on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LowbitError
from ..formats import fp4 as f4
from . import cpu
from .reference import linear_fake

RUNTIME_NAME = "fp4pack"


@functools.cache
def split_table(w_format: str) -> tuple[float, int, int, Tensor]:
    """(c, base B, parts, digits) for a format: digits int32 (16, parts), the int4 digits of each code's value v/c
    (code 8 = -0 gives zeros); v/c = digits[:, 0]·B + digits[:, 1] when parts = 2, digits[:, 0] when parts = 1."""
    fmt = f4.fp4_format(w_format)
    c = 2.0 ** (1 - fmt.m_bits)
    ints = (fmt.grid(0.0).to(torch.float64) / c)
    if not torch.equal(ints, ints.round()):
        raise LowbitError(f"FP4 format {fmt.name}: values are not multiples of {c}")  # cannot happen for E+M = 3
    ints = ints.round().to(torch.int32)
    if int(ints.abs().max()) <= 7:
        return c, 1, 1, ints.reshape(16, 1)
    for base in range(2, 16):
        a = torch.round(ints.double() / base).to(torch.int32)
        b = ints - a * base
        if int(a.abs().max()) <= 7 and int(b.abs().max()) <= 7:
            return c, base, 2, torch.stack([a, b], dim=1)
    raise LowbitError(f"FP4 format {fmt.name}: values do not split into two int4 digits")


def unsupported_reason(qweight: Tensor) -> str | None:
    """Why FP4 codes (a record's qweight) cannot take the fp4pack path (None: they can)."""
    if qweight.device.type != "cpu":
        return f"weights on {qweight.device.type}"
    if cpu.packed_block_n() is None:
        return "this CPU's int4pack weight layout is not one we can decode"
    return None


@dataclass
class FP4Pack:
    """An FP4 weight in the int4 kernel's form: what `lowbit::fp4pack_linear` takes."""

    packed: Tensor  # uint8 (parts · n_pad, k_pad / 2): digit rows, part after part
    scales_zeros: Tensor  # bfloat16 (k_pad / group_size, parts · n_pad, 2): c·B (first part) or c, zero 0
    row_scale: Tensor  # float32 (out_features,): the record's per-row scales
    group_size: int
    digit_base: int  # B (value = a·B + b) with two digits per weight, 0 with one
    in_features: int
    out_features: int
    w_format: str
    prefill_rows: int = cpu.DEQUANT_MIN_ROWS  # as cpu.Int4Pack: decided at packing time, passed to the op
    prefill_bf16: bool = True

    @property
    def parts(self) -> int:
        return 2 if self.digit_base else 1

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2 + self.row_scale.numel() * 4

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.in_features * self.out_features)

    def describe(self) -> str:
        split = f", {self.w_format} as {self.parts} int4 digits" if self.parts > 1 else f", {self.w_format}"
        return f"{RUNTIME_NAME} {self.bits_per_weight():.2f} b/w in memory{split}"


def pack_fp4(qweight: Tensor, w_scales: Tensor, w_format: str, in_features: int, fqn: str = "?") -> FP4Pack:
    """FP4 codes (packed two per byte, as in the record) + row scales -> the int4 kernel's form."""
    reason = unsupported_reason(qweight)
    if reason is not None:
        raise LowbitError(f"layer {fqn}: no fp4pack form ({reason}); use the reference op (kernels='reference')")
    n, k = qweight.shape[0], in_features
    c, base, parts, digits = split_table(w_format)
    codes = f4.unpack_codes(qweight, k).long()
    k_pad, n_pad = cpu._round_up(k, cpu.K_ALIGN), cpu._round_up(n, cpu.N_ALIGN)
    g = next(s for s in cpu.KERNEL_GROUP_SIZES if k_pad % s == 0)
    q = torch.full((parts * n_pad, k_pad), 8, dtype=torch.int32)  # code 8: digit 0 in the padding
    for p in range(parts):
        q[p * n_pad:p * n_pad + n, :k] = 8 + digits[:, p][codes]
    part_scale = [c * base, c] if parts == 2 else [c]
    s = torch.tensor(part_scale, dtype=torch.float32).repeat_interleave(n_pad)  # exact in bfloat16
    s = s.reshape(1, -1).expand(k_pad // g, -1)
    scales_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).to(torch.bfloat16).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    row_scale = w_scales.reshape(-1).to(torch.float32).contiguous()
    return FP4Pack(packed, scales_zeros, row_scale, g, base if parts == 2 else 0, k, n, f4.fp4_format(w_format).name,
                   *cpu.prefill_choice())


# ----------------------------------------------------------------------------- the computation


def _matmul_dequantized(h: Tensor, packed: Tensor, parts: int, base: int) -> Tensor:
    """h (rows, k_pad) bfloat16 or float32 times the bias-0 FP4 values / c, float32 (rows, n_pad): the digits
    combine exactly in int8 (|a·B + b| ≤ 7·15 + 7), convert exactly to h's dtype, one GEMM per column tile."""
    n_pad, k_pad = packed.shape[0] // parts, packed.shape[1] * 2
    outs = []
    for c0, c1 in cpu.dequant_tiles(n_pad, k_pad):
        v = cpu.signed_codes_t(packed, (c0, c1))
        if parts == 2:
            v = v * base + cpu.signed_codes_t(packed, (n_pad + c0, n_pad + c1))
        outs.append((h @ v.to(h.dtype)).to(torch.float32))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def fp4pack_linear_impl(x, packed, scales_zeros, row_scale, su, rot_in, act_shift, act_scale, a_format, bias,
                        in_features, out_features, group_size, digit_base, prefill_rows, prefill_bf16):
    parts = 2 if digit_base else 1
    lead = x.shape[:-1]
    h = x.reshape(-1, in_features).to(torch.float32)
    if su is not None:
        h = cpu.kron_apply(h * su, rot_in)
    if act_shift is not None:
        h = h * f4.exponent_multipliers(act_shift)
    post = row_scale
    if a_format is not None:
        s = act_scale.to(torch.float32).reshape(())
        h = f4.quantize_unscaled(h, f4.fp4_format(a_format), s)
        post = post * s
    k_pad = packed.shape[1] * 2
    if k_pad != in_features:
        h = torch.nn.functional.pad(h, (0, k_pad - in_features))
    n_pad = packed.shape[0] // parts
    if h.shape[0] >= prefill_rows:  # values / c in the GEMM, c (the last part's kernel scale) after
        y = _matmul_dequantized(h.to(torch.bfloat16 if prefill_bf16 else torch.float32), packed, parts, digit_base) \
            * scales_zeros[0, -1, 0].to(torch.float32)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), packed, group_size,
                                                       scales_zeros).to(torch.float32)
        if parts == 2:
            y = y[:, :n_pad] + y[:, n_pad:]
    y = y[:, :out_features] * post
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*lead, out_features)


@torch.library.custom_op("lowbit::fp4pack_linear", mutates_args=())
def fp4pack_linear(
    x: Tensor,
    packed: Tensor,
    scales_zeros: Tensor,
    row_scale: Tensor,
    su: Tensor | None,
    rot_in: list[Tensor],
    act_shift: Tensor | None,
    act_scale: Tensor | None,
    a_format: str | None,
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    group_size: int,
    digit_base: int,
    prefill_rows: int,
    prefill_bf16: bool,
) -> Tensor:
    """`lowbit::fp4_linear` (after the fp4-rot input rotation when su is given) on the CPU int4 kernel, with the
    weight as packed by `pack_fp4` (see the module docstring): digit_base B for two int4 digits per weight
    (value a·B + b, the digit rows stacked), 0 for one."""
    if a_format is not None and act_scale is None:
        raise LowbitError(f"fp4pack_linear: activation format {a_format!r} needs act_scale (None means W4A16: "
                          f"pass a_format=None)")
    return fp4pack_linear_impl(x, packed, scales_zeros, row_scale, su, rot_in, act_shift, act_scale, a_format, bias,
                               in_features, out_features, group_size, digit_base, prefill_rows, prefill_bf16)


@fp4pack_linear.register_fake
def _(x, packed, scales_zeros, row_scale, su, rot_in, act_shift, act_scale, a_format, bias, in_features,
      out_features, group_size, digit_base, prefill_rows, prefill_bf16):
    return linear_fake("fp4pack_linear", x, in_features, out_features)


cpu.decompose_under_compile(fp4pack_linear, fp4pack_linear_impl)  # Inductor fuses around the int4 kernel


def op_args(w: FP4Pack, su: Tensor | None, act_shift: Tensor | None, act_scale: Tensor | None,
            a_format: str | None, bias: Tensor | None):
    """Everything but x for `lowbit::fp4pack_linear`, in order."""
    rot_in = list(cpu.rotation_blocks(w.in_features)) if su is not None else []
    return (w.packed, w.scales_zeros, w.row_scale, su, rot_in, act_shift, act_scale, a_format, bias, w.in_features,
            w.out_features, w.group_size, w.digit_base, w.prefill_rows, w.prefill_bf16)
