"""Host side of the Triton kernels: shapes, block sizes, grids; the same math as `kernels/reference.py`.

Every launch goes through `torch.library.wrap_triton`, so when these functions run inside the body of a
`torch.library.triton_op` under torch.compile, Inductor sees (and schedules) the kernels themselves. Outside
of tracing, wrap_triton hands back the plain kernel. The functions accept any device the kernels can run on:
CUDA, or CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from ...errors import LowbitError
from ...formats import fp4 as f4
from ...formats import integer, packing
from . import hadamard as hk
from . import matmul as mk

MAX_FUSED_POW2 = 1 << 14  # largest 2^k transformed by one program (a 128×128 tile, in column chunks)
STRIDED_PIECE = 1 << 10  # above that: pieces of 2^10, then a strided pass of H_S, S = P / 2^10 ≤ 128
MAX_POW2 = STRIDED_PIECE * 128
GEMV_MAX_M = 16


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    """A weight-side tensor on the activations' device (a no-op when it is there already, the normal case)."""
    return None if t is None else t.to(device)


# ----------------------------------------------------------------------------- Hadamard


def _tile_shape(p: int) -> tuple[int, int]:
    """(R, C) with R·C = p, both powers of two: (1, p) up to 128, else C ≥ R ≥ 16 as square as possible."""
    if p <= 128:
        return 1, p
    c = 1 << (p.bit_length() // 2)
    return p // c, c


def _fwht(x: Tensor, out: Tensor, signs: Tensor | None, bias: Tensor | None, p: int, sign_in: bool,
          sign_out: bool, scale: float) -> None:
    """Sylvester transform of every contiguous length-p piece of x (rows, n) into out; signs/bias have length n."""
    n = x.shape[-1]
    n_vectors = x.numel() // p
    per_row = n // p
    dummy = x
    out_parts = 3 if out.dtype == torch.float32 else 2  # bfloat16 parts of float32 operands (hadamard.py)
    s = dummy if signs is None else signs
    b = dummy if bias is None else bias
    if p > MAX_FUSED_POW2:
        if p > MAX_POW2:
            raise LowbitError(f"Triton Hadamard: power-of-two part {p} of the last dimension {n} is larger than "
                              f"the supported {MAX_POW2}")
        pieces = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        _fwht(x, pieces, signs, None, STRIDED_PIECE, sign_in, False, 1.0)
        s_len, block_t = p // STRIDED_PIECE, 64
        wrap_triton(hk.fwht_strided_kernel)[(n_vectors, triton.cdiv(STRIDED_PIECE, block_t))](
            pieces, s, b, out, per_row, scale,
            S=s_len, T=STRIDED_PIECE, BLOCK_T=block_t, SIGN_OUT=sign_out, HAS_BIAS=bias is not None,
            OUT_PARTS=out_parts, num_warps=8)
        return
    r, c = _tile_shape(p)
    if r == 1:  # about 2048 values per program (C < 16: the broadcast C×C product per vector)
        block_v = max(1, 2048 // (c * c if c < 16 else c))
        if isinstance(n_vectors, int):  # small inputs (tests): no idle rows; symbolic sizes keep the default
            block_v = min(block_v, triton.next_power_of_2(n_vectors))
        grid = (triton.cdiv(n_vectors, block_v),)
        warps = 4
    else:
        block_v = 1
        grid = (n_vectors,)
        warps = 4 if p <= 1024 else 8
    wrap_triton(hk.fwht_kernel)[grid](
        x, s, b, out, n_vectors, per_row, scale,
        R=r, C=c, BC=min(c, 32), BLOCK_V=block_v, SIGN_IN=sign_in and signs is not None,
        SIGN_OUT=sign_out and signs is not None, HAS_BIAS=bias is not None, OUT_PARTS=out_parts, num_warps=warps)


def _factor(z: Tensor, factor: Tensor, out: Tensor, k: int, p: int, transpose: bool) -> None:
    """out = (G ⊗ I_p) z per row, G = factor or its transpose; z, out (rows, k·p)."""
    n_cols = (z.numel() // (k * p)) * p
    block_a = 64 if k > 32 else 32 if k > 16 else 16
    block_b, block_c = 32, 64
    grid = (triton.cdiv(n_cols, block_c), triton.cdiv(k, block_a))
    wrap_triton(hk.factor_kernel)[grid](
        z, factor, out, n_cols, k, p,
        TRANSPOSE=transpose, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c, num_warps=4)


def hadamard(x: Tensor, signs: Tensor | None, factor: Tensor | None, inverse: bool = False,
             out_dtype: torch.dtype | None = None, bias: Tensor | None = None) -> Tensor:
    """`hadamard.apply(x, signs, factor, inverse)` (+ bias, inverse only) on the last dimension, in out_dtype."""
    n = x.shape[-1]
    k = 1 if factor is None else factor.shape[0]
    p = n // k
    if n % k or p & (p - 1):
        raise LowbitError(f"Hadamard factor of size {k} does not fit a last dimension of {n}: use factor({n})")
    if bias is not None and k > 1 and not inverse:
        raise LowbitError("Triton Hadamard: a bias is only fused into the inverse transform")
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    signs = None if signs is None else _on(x.device, signs).contiguous()
    bias = None if bias is None else _on(x.device, bias).contiguous()
    scale = 1.0 / math.sqrt(p)
    if k == 1:
        _fwht(x2, out, signs, bias, p, not inverse, inverse, scale)
    else:
        f = factor.to(device=x.device, dtype=torch.float32).contiguous()
        tmp = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
        if not inverse:  # (F ⊗ H)(s ⊙ x): signs and H first, then F
            _fwht(x2, tmp, signs, None, p, True, False, scale)
            _factor(tmp, f, out, k, p, transpose=False)
        else:  # s ⊙ (Fᵀ ⊗ H) y: Fᵀ first, then H, signs and bias
            _factor(x2, f, tmp, k, p, transpose=True)
            _fwht(tmp, out, signs, bias, p, False, True, scale)
    return out.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- dequant-matmul


def _dot_kind(dtype: torch.dtype) -> int:
    return {torch.float16: mk.DOT_FP16, torch.bfloat16: mk.DOT_BF16}.get(dtype, mk.DOT_FP32)


def _blocks(m: int, bits: int, group_size: int, dot_kind: int) -> dict:
    """Block sizes: GEMV for M ≤ 16 (decode), GEMM tiles above (prefill); K tiles inside one scale group.

    Sized so that no configuration spills registers on sm_90 (checked with `aot.py` and ptxas -v).
    """
    per_group, _ = packing.group_shape(bits)
    dot_k = per_group * (16 if per_group == 8 else 32)  # 16 or 32 byte groups: tl.dot's K ≥ 16
    if m <= GEMV_MAX_M:
        block_m = next(b for b in (1, 2, 4, 8, 16) if m <= b)  # comparisons only: fine on a SymInt
        use_dot = block_m > 4
        block_n = 32 if use_dot else 16
        block_k = dot_k if use_dot else 256 if block_m == 1 else 128
        warps = 8 if use_dot and dot_kind == mk.DOT_FP32 else 4  # tf32x3 holds three operand copies
    else:
        block_m, block_n, use_dot, block_k, warps = 64, 64, True, dot_k, 8
    min_k = (16 if use_dot else 1) * per_group
    if group_size and group_size & (group_size - 1) == 0 and min_k <= group_size < block_k:
        block_k = group_size  # one scale per tile and row: scaled after the dot
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, num_warps=warps, num_stages=3)


def _matmul(a: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, out_dtype: torch.dtype,
            dot_kind: int, bias: Tensor | None = None, w_fp4: f4.FP4Format | None = None,
            a_fp4: f4.FP4Format | None = None, act_shift: Tensor | None = None,
            act_scale: Tensor | None = None) -> Tensor:
    """out (M, N) = A (M, K) · Ŵᵀ, Ŵ decoded from packed codes (see matmul.py); A is contiguous."""
    m, k = a.shape
    n = qweight.shape[0]
    per_group, _ = packing.group_shape(bits)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    cfg = _blocks(m, bits, group_size, dot_kind)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    zero = 0.0 if w_fp4 is not None else integer.int_format(bits).zero
    wrap_triton(mk.lowbit_matmul_kernel)[grid](
        a, qweight.contiguous(), scales.contiguous(),
        a if act_shift is None else act_shift,
        a if act_scale is None else act_scale,
        a if bias is None else bias,
        out, m, n, k, qweight.shape[1], scales.shape[1],
        BITS=bits, L=per_group, ZERO=zero, GROUP_SIZE=group_size,
        W_FP4=w_fp4 is not None, W_E=w_fp4.e_bits if w_fp4 else 0, W_M=w_fp4.m_bits if w_fp4 else 0,
        A_FP4=a_fp4 is not None, A_E=a_fp4.e_bits if a_fp4 else 0, A_M=a_fp4.m_bits if a_fp4 else 0,
        A_MAX=a_fp4.max_value(0.0) if a_fp4 else 0.0,
        HAS_SHIFT=act_shift is not None, HAS_BIAS=bias is not None, DOT_KIND=dot_kind, **cfg)
    return out


def rotated_linear(x: Tensor, qweight: Tensor, scales: Tensor, su: Tensor | None, sv: Tensor | None,
                   had_in: Tensor | None, had_out: Tensor | None, bias: Tensor | None, bits: int,
                   in_features: int, group_size: int) -> Tensor:
    """`reference.rotated_linear_ref` with the Triton kernels: Hadamard in, dequant-matmul, Hadamard out (+bias)."""
    if x.shape[-1] != in_features:
        raise LowbitError(f"rotated_linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    integer.num_groups(in_features, group_size)  # validates the group size
    qweight, scales, su, sv, had_in, had_out, bias = (
        _on(x.device, t) for t in (qweight, scales, su, sv, had_in, had_out, bias))
    n = qweight.shape[0]
    x2 = x.reshape(-1, in_features).contiguous()
    gemv = x2.shape[0] <= GEMV_MAX_M
    h = x2
    if su is not None:  # float32 for decode (negligible traffic), the GEMM's operand dtype for prefill
        h = hadamard(x2, su, had_in, out_dtype=torch.float32 if gemv else x.dtype)
    y = _matmul(h, qweight, scales.contiguous(), bits, group_size,
                out_dtype=x.dtype if sv is None else torch.float32, dot_kind=_dot_kind(x.dtype),
                bias=bias if sv is None else None)
    if sv is not None:
        y = hadamard(y, sv, had_out, inverse=True, out_dtype=x.dtype, bias=bias)
    return y.reshape(*x.shape[:-1], n)


def fp4_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, act_shift: Tensor | None, act_scale: Tensor | None,
               w_format: str, a_format: str | None, bias: Tensor | None, in_features: int) -> Tensor:
    """`fp4_ops.fp4_linear_ref` with the Triton kernel: W4A16, or W4A4 with activations rounded in registers."""
    if x.shape[-1] != in_features:
        raise LowbitError(f"fp4_linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    if a_format is not None and act_scale is None:
        raise LowbitError(f"fp4_linear: activation format {a_format!r} needs act_scale (None means W4A16: "
                          f"pass a_format=None)")
    qweight, w_scales, act_shift, act_scale, bias = (
        _on(x.device, t) for t in (qweight, w_scales, act_shift, act_scale, bias))
    w_fmt = f4.fp4_format(w_format)
    a_fmt = None if a_format is None else f4.fp4_format(a_format)
    x2 = x.reshape(-1, in_features).contiguous()
    # W4A4: both operands are unscaled FP4 values, exact in bfloat16, whatever the activation dtype
    dot_kind = mk.DOT_BF16 if a_fmt is not None else _dot_kind(x.dtype)
    y = _matmul(x2, qweight, w_scales.reshape(-1, 1).contiguous(), f4.CODE_BITS, 0, out_dtype=x.dtype,
                dot_kind=dot_kind, bias=bias, w_fp4=w_fmt, a_fp4=a_fmt,
                act_shift=None if act_shift is None else act_shift.contiguous(),
                act_scale=None if act_scale is None else act_scale.reshape(1))
    return y.reshape(*x.shape[:-1], qweight.shape[0])
