"""Dequant-matmul kernels: y = A · Ŵᵀ with Ŵ decoded in registers from packed integer or FP4 codes.

One kernel, specialised by constexprs, computes the math of `reference.rotated_linear_ref` (without the
transforms, which are the Hadamard kernels) and of `fp4_ops.fp4_linear_ref`:

- integer weights, `formats.integer`: Ŵ = (code - ZERO) · scale, scale per row (GROUP_SIZE 0) or per group;
- FP4 weights, `formats.fp4`: Ŵ = value(code) · w_scale (per row);
- optional per-channel activation shift A ⊙ 2^k and FP4 activation rounding at the per-tensor act_scale (W4A4).

Per-row scales (and the act_scale) multiply the accumulator once at the end, so the dot operands are the
unscaled code values, exact in bfloat16/float16: (code - ZERO) has at most 8 significant bits, FP4 values and
rounded FP4 activations at most 3. Per-group scales multiply each K tile's partial product when the tile lies
inside one group (GROUP_SIZE a multiple of BLOCK_K), else the decoded weights element by element.

Two schedules, picked on the host by M:
- GEMV (decode, M ≤ 16): USE_DOT False for M ≤ 4 (broadcast-multiply-reduce in float32 on the CUDA cores:
  the weight stream is the cost), tl.dot with a small BLOCK_M above; small BLOCK_N, long BLOCK_K.
- GEMM (prefill): tl.dot on BLOCK_M×BLOCK_N tiles, operands in the activation dtype (bfloat16 for W4A4;
  "tf32x3" for float32 activations, i.e. float32 accuracy).

The K tile is decoded as L sub-tiles (`decode.py`): sub-tile i holds codes k = L·j + i, multiplied with the
activations loaded at the same k (stride L), so decoding needs no register shuffles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode import code_at, fp4_round, fp4_value, load_code_bytes, pow2

DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2


@triton.jit
def _dot(a, w, acc, DOT_KIND: tl.constexpr):
    """acc + a (BM, J) · wᵀ (w is (BN, J)) on tensor cores."""
    if DOT_KIND == 0:
        return tl.dot(a, tl.trans(w), acc, input_precision="tf32x3")
    elif DOT_KIND == 1:
        return tl.dot(a.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
    else:
        return tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)


@triton.jit
def lowbit_matmul_kernel(
    a_ptr, q_ptr, s_ptr, shift_ptr, act_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_q, stride_s,
    BITS: tl.constexpr, L: tl.constexpr, ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
    W_FP4: tl.constexpr, W_E: tl.constexpr, W_M: tl.constexpr,
    A_FP4: tl.constexpr, A_E: tl.constexpr, A_M: tl.constexpr, A_MAX: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_KIND: tl.constexpr,
):
    """out (M, N) = A (M, K) · Ŵᵀ, Ŵ (N, K) from packed codes q (N, stride_q bytes) and scales (N, stride_s)."""
    J: tl.constexpr = BLOCK_K // L  # byte groups per K tile
    TILE_SCALE: tl.constexpr = GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0
    if USE_DOT and DOT_KIND != 0:
        tl.static_assert(J >= 16, "tl.dot on 16-bit operands needs K tiles of at least 16")
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = m < M
    q_rows = n.to(tl.int64)[:, None] * stride_q
    a_rows = m.to(tl.int64)[:, None] * K
    n_code_groups = (K + L - 1) // L
    if A_FP4:
        act_scale = tl.load(act_scale_ptr).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // L + tl.arange(0, J)
        word = load_code_bytes(q_ptr, q_rows, g[None, :], n_mask[:, None] & (g < n_code_groups)[None, :], BITS)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(L):
            k = g * L + i
            k_mask = k < K
            c = code_at(word, i, BITS)
            if W_FP4:
                w = fp4_value(c, W_E, W_M)
            else:
                w = c.to(tl.float32) - ZERO
            if GROUP_SIZE > 0 and not TILE_SCALE:
                s = tl.load(s_ptr + n.to(tl.int64)[:, None] * stride_s + (k // GROUP_SIZE)[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                w = w * s.to(tl.float32)
            a = tl.load(a_ptr + a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a = a.to(tl.float32)
            if HAS_SHIFT:
                a = a * pow2(tl.load(shift_ptr + k, mask=k_mask, other=0).to(tl.int32))[None, :]
            if A_FP4:
                a = fp4_round(a, act_scale, A_E, A_M, A_MAX)
            if USE_DOT:
                part = _dot(a, w, part, DOT_KIND)
            else:
                part += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
        if TILE_SCALE:
            s = tl.load(s_ptr + n.to(tl.int64) * stride_s + k0 // GROUP_SIZE, mask=n_mask, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
        else:
            acc += part

    if GROUP_SIZE == 0:
        acc = acc * tl.load(s_ptr + n.to(tl.int64) * stride_s, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if A_FP4:
        acc = acc * act_scale
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
