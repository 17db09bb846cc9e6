"""Triton kernels of the randomized Hadamard transform y = (F ⊗ H_P/√P)(signs ⊙ x), `hadamard.apply`'s math.

The Sylvester transform of a length-P vector is a pair of small matmuls: viewing the vector as an R×C tile
(row-major, P = R·C), H_P = H_R ⊗ H_C gives H_P x = vec(H_R · X · H_C). The ±1 matrices are generated in
registers (H[i, j] = (-1)^popcount(i & j)) and multiplied on tensor cores with tl.dot, in 16-bit operands:
- a 16-bit input is an exact operand as it is (±1 products are exact, the accumulation is float32);
- a float32 operand is split into bfloat16 parts, a = a1 + a2 (+ a3), each part multiplied exactly: two parts
  carry 16 significant bits (plenty for a 16-bit output), three carry all 24 (float32 accuracy).
The output is produced in column chunks of BC: Y[:, c] = H_R · (X · H_C[:, c]), so only X, H_R and one chunk
live in registers (a 128×128 tile compiles without spills on sm_90, see `aot.py`).

Kernels:
- `fwht_kernel`: one or more whole vectors per program, P ≤ MAX_FUSED_POW2 (launch.py), signs on the input
  (forward) or on the output (inverse), scale, optional bias, cast to the output dtype.
- `fwht_strided_kernel`: the second pass above that: H_S along an axis of stride T (the contiguous length-T
  pieces were transformed by `fwht_kernel` first), P = S·T, S ≤ 128.
- `factor_kernel`: the dense K×K factor F (or Fᵀ) of n = K·P, a GEMM over the K blocks of every row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sylvester(N: tl.constexpr, j0, BJ: tl.constexpr, dtype: tl.constexpr):
    """Columns j0 .. j0+BJ of the N×N ±1 Sylvester Hadamard matrix (N ≤ 2^16), in registers."""
    i = tl.arange(0, N)[:, None]
    j = j0 + tl.arange(0, BJ)[None, :]
    v = i & j
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return (1 - 2 * (v & 1)).to(tl.float32).to(dtype)  # via float32: the interpreter casts int->bf16 as bits


@triton.jit
def split_dot(a, b, acc, PARTS: tl.constexpr, A_LEFT: tl.constexpr):
    """acc + a·b (A_LEFT) or acc + b·a, b a bfloat16 matrix of exact values, a float32 split into PARTS parts."""
    r = a
    for _ in tl.static_range(PARTS):
        part = r.to(tl.bfloat16)
        if A_LEFT:
            acc = tl.dot(part, b, acc)
        else:
            acc = tl.dot(b, part, acc)
        r = r - part.to(tl.float32)  # exact: the rounding error of the part
    return acc


@triton.jit
def times_sylvester(x, C: tl.constexpr, c0, BC: tl.constexpr):
    """x (rows, C) · H_C[:, c0:c0+BC] in float32; x float32 (all 24 bits kept) or 16-bit (exact products)."""
    if C < 16:  # below tl.dot's minimum size: broadcast and reduce
        h = sylvester(C, c0, BC, tl.float32)
        return tl.sum(x.to(tl.float32)[:, :, None] * h[None, :, :], axis=1)
    elif x.dtype == tl.float32:
        acc = tl.zeros((x.shape[0], BC), dtype=tl.float32)
        return split_dot(x, sylvester(C, c0, BC, tl.bfloat16), acc, 3, True)
    else:
        return tl.dot(x, sylvester(C, c0, BC, x.dtype))


@triton.jit
def sylvester_times(z, R: tl.constexpr, PARTS: tl.constexpr):
    """H_R · z for z (R, cols) float32 (R ≥ 16), z split in PARTS bfloat16 parts."""
    acc = tl.zeros(z.shape, dtype=tl.float32)
    return split_dot(z, sylvester(R, 0, R, tl.bfloat16), acc, PARTS, False)


@triton.jit
def _epilogue(y, offs, sign_offs, mask, signs_ptr, bias_ptr, out_ptr, scale,
              SIGN_OUT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = y * scale
    if SIGN_OUT:
        y = y * tl.load(signs_ptr + sign_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + sign_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fwht_kernel(x_ptr, signs_ptr, bias_ptr, out_ptr, n_vectors, vectors_per_row, scale,
                R: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BLOCK_V: tl.constexpr,
                SIGN_IN: tl.constexpr, SIGN_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_PARTS: tl.constexpr):
    """Sylvester transform of contiguous length-(R·C) vectors; `signs`/`bias` are indexed by the position in
    the row (vector index mod vectors_per_row, then the offset in the vector), i.e. they have the row's length.

    R == 1: BLOCK_V vectors of length C per program, Y = X·H_C. R > 1: one vector per program, Y = H_R·X·H_C,
    BC output columns at a time. OUT_PARTS: bfloat16 parts of the float32 X·H_C in the second product, 3 (all
    its bits) for a float32 output, 2 for a 16-bit one.
    """
    pid = tl.program_id(0)
    if R == 1:
        vec = pid * BLOCK_V + tl.arange(0, BLOCK_V)
        col = tl.arange(0, C)
        mask = (vec < n_vectors)[:, None] & (col < C)[None, :]
        offs = vec.to(tl.int64)[:, None] * C + col[None, :]
        sign_offs = (vec % vectors_per_row)[:, None] * C + col[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if SIGN_IN:  # ±1: exact in the input dtype, so a 16-bit input stays an exact tensor-core operand
            s = tl.load(signs_ptr + sign_offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        y = times_sylvester(x, C, 0, C)
        _epilogue(y, offs, sign_offs, mask, signs_ptr, bias_ptr, out_ptr, scale, SIGN_OUT, HAS_BIAS)
    else:
        row = tl.arange(0, R)
        local = row[:, None] * C + tl.arange(0, C)[None, :]
        x = tl.load(x_ptr + pid.to(tl.int64) * (R * C) + local)
        if SIGN_IN:
            s = tl.load(signs_ptr + (pid % vectors_per_row) * (R * C) + local)
            x = (x.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        for c0 in tl.static_range(0, C, BC):
            y = sylvester_times(times_sylvester(x, C, c0, BC), R, OUT_PARTS)
            chunk = row[:, None] * C + c0 + tl.arange(0, BC)[None, :]
            mask = (row < R)[:, None] & (tl.arange(0, BC) < BC)[None, :]
            _epilogue(y, pid.to(tl.int64) * (R * C) + chunk, (pid % vectors_per_row) * (R * C) + chunk, mask,
                      signs_ptr, bias_ptr, out_ptr, scale, SIGN_OUT, HAS_BIAS)


@triton.jit
def fwht_strided_kernel(x_ptr, signs_ptr, bias_ptr, out_ptr, vectors_per_row, scale,
                        S: tl.constexpr, T: tl.constexpr, BLOCK_T: tl.constexpr,
                        SIGN_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_PARTS: tl.constexpr):
    """H_S along the strided axis of vectors viewed as (S, T): program (vector, T-block) does H_S · X[:, block]."""
    vec = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    s = tl.arange(0, S)
    mask = (s < S)[:, None] & (t < T)[None, :]
    local = s[:, None] * T + t[None, :]
    offs = vec.to(tl.int64) * (S * T) + local
    sign_offs = (vec % vectors_per_row) * (S * T) + local
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = sylvester_times(x, S, OUT_PARTS)
    _epilogue(y, offs, sign_offs, mask, signs_ptr, bias_ptr, out_ptr, scale, SIGN_OUT, HAS_BIAS)


@triton.jit
def factor_kernel(z_ptr, f_ptr, out_ptr, n_cols, K, P,
                  TRANSPOSE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y[m, a, b] = Σ_c G[a, c] · Z[m, c, b] with G = F (or Fᵀ), for rows viewed as (K, P).

    A GEMM of G (K×K) with the K×(rows·P) matrix whose column (m, b) lives at m·K·P + b with stride P. G is a
    general float32 matrix (±1/√K or random orthogonal), so the product uses tf32x3: float32 accuracy.
    """
    col = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    col_base = (col // P).to(tl.int64) * K * P + col % P
    acc = tl.zeros((BLOCK_A, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_B):
        c = c0 + tl.arange(0, BLOCK_B)
        g_mask = (a < K)[:, None] & (c < K)[None, :]
        if TRANSPOSE:
            g = tl.load(f_ptr + c[None, :] * K + a[:, None], mask=g_mask, other=0.0)
        else:
            g = tl.load(f_ptr + a[:, None] * K + c[None, :], mask=g_mask, other=0.0)
        z_mask = (c < K)[:, None] & (col < n_cols)[None, :]
        z = tl.load(z_ptr + c[:, None] * P + col_base[None, :], mask=z_mask, other=0.0)
        acc = tl.dot(g.to(tl.float32), z.to(tl.float32), acc, input_precision="tf32x3")
    mask = (a < K)[:, None] & (col < n_cols)[None, :]
    tl.store(out_ptr + a[:, None] * P + col_base[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
