"""LDLQ adaptive rounding (QuIP) = OPTQ/GPTQ, Hessian damping, and greedy coordinate-descent passes.

Conventions: W is (rows = out_features, n = in_features), H = E[x xᵀ] is (n, n) and the proxy loss of Ŵ
is tr((Ŵ−W) H (Ŵ−W)ᵀ). Rows are independent given H, so every row can have its own scales.

LDLQ (Chee et al. 2023, sec. 3): with H = (I+Ů) D (I+Ů)ᵀ, Ů strictly upper triangular and D diagonal,
column k is rounded after adding the feedback of the errors already made on columns < k:

    A_k = W_k + (W − Ŵ)_{:,<k} Ů_{<k,k},    Ŵ_k = Q(A_k).

This is OPTQ/GPTQ's update written with the LDL factor of H instead of the upper Cholesky factor of H⁻¹
(QuIP shows the two are the same algorithm): one Cholesky instead of three, and the proxy loss comes for
free, without cancellation: tr(E H Eᵀ) = Σ_k d_k ‖A_k − Ŵ_k‖². The feedback is pulled in lazily, one GEMM
per block of columns, as GPTQ does with its pushes. Work happens in the dtype of W (float32, or float64
where tests need exact agreement); the factorization is always float64.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from .. import formats
from ..errors import LowbitError
from ..formats import IntFormat

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 128
MAX_DAMP = 10.0  # the damping fallback stops here (relative to the mean of diag H)
# A pivot below this fraction of mean(diag H) counts as singular: its feedback would blow up the rounding.
MIN_PIVOT = 1e-10


def _where(fqn: str) -> str:
    return f"layer {fqn}: " if fqn else ""


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------- proxy loss


def proxy_loss_rows(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row (Ŵ−W)_r H (Ŵ−W)_rᵀ, computed in the widest dtype of the inputs."""
    dt = torch.promote_types(torch.promote_types(w.dtype, w_hat.dtype), h.dtype)
    e = w_hat.to(dt) - w.to(dt)
    return ((e @ h.to(dt)) * e).sum(dim=-1)


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((Ŵ−W) H (Ŵ−W)ᵀ)."""
    return float(proxy_loss_rows(w, w_hat, h).sum())


# ----------------------------------------------------------------------------- factorization and damping


@dataclass(frozen=True)
class LDL:
    """H = U diag(d) Uᵀ with U unit upper triangular: U − I is LDLQ's feedback matrix Ů.

    Computed in float64; U may be cast to the work dtype once before several LDLQ runs."""

    u: torch.Tensor
    d: torch.Tensor


def _try_ldl(h: torch.Tensor) -> LDL | None:
    """The upper LDL factor of a float64 H, or None when H is not positive definite to working precision."""
    # Cholesky of the reversed matrix gives the upper triangular R with H = R Rᵀ.
    l, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        return None
    r = l.flip(0, 1)
    del l
    piv = r.diagonal().clone()
    floor = MIN_PIVOT * float(h.diagonal().mean())
    if not all_finite(piv) or float(piv.square().min()) <= floor:  # finite pivots: finite factor
        return None
    return LDL(r.div_(piv), piv.square())


def ldl_upper(h: torch.Tensor, fqn: str = "") -> LDL:
    """LDL factor of a positive definite H (damp it first with `damp_hessian`)."""
    ldl = _try_ldl(h.to(torch.float64))
    if ldl is None:
        raise LowbitError(f"{_where(fqn)}Hessian is not positive definite; damp it with damp_hessian first")
    return ldl


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. A float64 sum is finite exactly then, barring overflow, which the exact test
    settles; the sum is 10x faster than torch.isfinite(x).all() on a large matrix."""
    return math.isfinite(float(x.sum(dtype=torch.float64))) or bool(torch.isfinite(x).all())


def check_hessian(h: torch.Tensor, n: int, fqn: str = "") -> None:
    """Shape (n, n) and finite, or a LowbitError naming the layer."""
    if h.dim() != 2 or tuple(h.shape) != (n, n):
        raise LowbitError(f"{_where(fqn)}Hessian has shape {tuple(h.shape)}, expected ({n}, {n}) = "
                          f"(in_features, in_features)")
    if not all_finite(h):
        n_nan, n_inf = int(torch.isnan(h).sum()), int(torch.isinf(h).sum())
        raise LowbitError(
            f"{_where(fqn)}Hessian has {n_nan} NaN and {n_inf} Inf entries; check the calibration data "
            f"(NaN/Inf activations, float16 overflow), or keep the layer in float"
        )


@dataclass(frozen=True)
class DampedHessian:
    h: torch.Tensor  # float64 (n, n), damped, dead diagonal entries set to 1
    dead: torch.Tensor  # bool (n,): inputs that were always zero; the caller zeroes W[:, dead]
    damp: float  # damping actually used, as a fraction of mean(diag H)
    ldl: LDL  # factor of h, for ldlq_factored


def damp_hessian(h: torch.Tensor, damp: float = 0.01, fqn: str = "") -> DampedHessian:
    """H + damp·mean(diag H)·I in float64, as GPTQ/QuIP do.

    Inputs that were always zero (diag H = 0) get H[i, i] = 1 so H stays invertible; their weight columns
    do not matter and the caller zeroes them. When the damped H is still not positive definite (rank
    deficient or slightly indefinite from accumulation error) the damping grows tenfold, up to MAX_DAMP.
    """
    check_hessian(h, h.shape[0] if h.dim() == 2 else -1, fqn)
    if damp < 0:
        raise LowbitError(f"{_where(fqn)}damping {damp} is negative; use a small positive value such as 0.01")
    h = h.to(torch.float64, copy=True)
    diag = h.diagonal()  # a view: edits below change h
    dead = diag == 0
    diag[dead] = 1.0
    base = float(diag.mean())
    used, applied = damp, 0.0
    while True:
        diag.add_((used - applied) * base)
        applied = used
        ldl = _try_ldl(h)
        if ldl is not None:
            break
        if used >= MAX_DAMP:
            raise LowbitError(
                f"{_where(fqn)}Hessian is not positive definite even with damping {used:g} x mean(diag H); "
                f"check the calibration data (too few or degenerate samples), or keep the layer in float"
            )
        used = min(max(used * 10, 1e-4), MAX_DAMP)
    if used != damp:
        log.warning("%sHessian not positive definite with damping %g; used damping %g", _where(fqn), damp, used)
    return DampedHessian(h, dead, used, ldl)


# ----------------------------------------------------------------------------- LDLQ


# Adding and subtracting 1.5·2^(mantissa bits) rounds half to even exactly like torch.round, for values
# clamped to the code range, but as two cheap adds: torch.round goes through a vectorized-math kernel that
# opens a parallel region even for a few thousand elements, 100x dearer than the arithmetic on a busy CPU.
_ROUNDER = {torch.float32: 1.5 * 2.0**23, torch.float64: 1.5 * 2.0**52}


def nearest_code(v: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """round(v) clamped to [0, max_code], in place; v already holds w / s + zero."""
    m = _ROUNDER[v.dtype]
    return v.clamp_(0, fmt.max_code).add_(m).sub_(m)


def _column_scales(scales: torch.Tensor, n: int, group_size: int, dt: torch.dtype):
    """(groups, rows) scales in the work dtype and the number of columns per group."""
    g = formats.num_groups(n, group_size)
    if scales.shape[-1] != g:
        raise LowbitError(f"scales have {scales.shape[-1]} groups per row, expected {g}")
    return scales.to(dt).t().contiguous(), n // g


def _check_sizes(n: int, h_size: int, block_size: int) -> None:
    if h_size != n:
        raise LowbitError(f"Hessian is {h_size} x {h_size} but the weight has {n} input columns")
    if block_size < 1:
        raise LowbitError(f"block_size must be positive, got {block_size}")


def native_loop() -> bool:
    """Whether LDLQ's column loop runs in the native library (kernels/native, op `ldlq`): the same operations in the
    same order as the Python loop below, so the same codes and loss bit for bit, 15-20x faster on layers of a few
    hundred rows. LOWBIT_NATIVE_LDLQ=0 keeps the Python loop; without a C++ compiler the Python loop runs."""
    if os.environ.get("LOWBIT_NATIVE_LDLQ", "1") == "0":
        return False
    from ..kernels import native

    return native.available()


def ldlq_factored(w: torch.Tensor, ldl: LDL, scales: torch.Tensor, fmt: IntFormat, group_size: int,
                  block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """LDLQ codes (rows, n) uint8 for fixed scales, and the per-row proxy loss (float64) under U diag(d) Uᵀ."""
    rows, n = w.shape
    dt = _work_dtype(w)
    _check_sizes(n, ldl.u.shape[0], block_size)
    st, per_group = _column_scales(scales, n, group_size, dt)
    # Transposed layout: column k of W is the contiguous row k, so every per-column step is contiguous.
    wt = w.to(dt).t().contiguous()
    ut = ldl.u.t().to(dt)  # ut[k, j] = Ů[j, k] for j < k
    d = ldl.d.to(dt)
    if native_loop():
        codes, loss = torch.ops.lowbit_native.ldlq(wt, ut, d, st, per_group, fmt.zero, fmt.max_code, block_size)
        return codes.t().contiguous(), loss
    et = torch.empty_like(wt)  # W − Ŵ
    codes = torch.empty((n, rows), dtype=torch.uint8)
    loss = torch.zeros(rows, dtype=torch.float64)
    zero = fmt.zero
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        # feedback from all earlier blocks in one GEMM; from this block's columns one GEMV at a time
        at = torch.addmm(wt[b0:b1], ut[b0:b1, :b0], et[:b0]) if b0 else wt[b0:b1].clone()
        for k in range(b0, b1):
            a = at[k - b0]
            if k > b0:
                a.addmv_(et[b0:k].t(), ut[k, b0:k])
            s = st[k // per_group]
            q = nearest_code(a / s + zero, fmt)
            codes[k] = q.to(torch.uint8)
            w_hat = q.sub_(zero).mul_(s)
            torch.sub(wt[k], w_hat, out=et[k])
            a.sub_(w_hat)  # A_k − Ŵ_k, for the loss
        loss += (at.square_() * d[b0:b1, None]).sum(dim=0)
    return codes.t().contiguous(), loss


def ldlq(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, fmt: IntFormat, group_size: int,
         block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """LDLQ/OPTQ codes (rows, n) uint8 of w for fixed float16 scales (rows, groups); H positive definite."""
    return ldlq_factored(w, ldl_upper(h), scales, fmt, group_size, block_size)[0]


# ----------------------------------------------------------------------------- greedy passes


def greedy_refine(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: IntFormat,
                  group_size: int, passes: int, block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """QuIP's coordinate descent after LDLQ: each column in turn takes the level that minimizes the proxy loss
    with all other columns fixed. Returns the codes and the per-row change of the proxy loss (float64, <= 0).

    For column k the best level is the one nearest Ŵ_k + ((W−Ŵ) H)_k / H_kk (a 1-D quadratic), so the loss
    never increases. G = (W−Ŵ) H is kept up to date lazily: one GEMM per block of columns.
    """
    rows, n = w.shape
    change = torch.zeros(rows, dtype=torch.float64)
    if passes <= 0:
        return codes, change
    dt = _work_dtype(w)
    _check_sizes(n, h.shape[0], block_size)
    st, per_group = _column_scales(scales, n, group_size, dt)
    h = h.to(dt)
    ct = codes.t().contiguous()
    zero = fmt.zero
    group_of = torch.arange(n) // per_group
    w_hat = (ct.to(dt) - zero) * st[group_of]  # Ŵ transposed: (n, rows)
    gt = h @ (w.to(dt).t() - w_hat)  # G transposed (H is symmetric)
    hdiag = h.diagonal()
    for _ in range(passes):
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            delta = torch.zeros((b1 - b0, rows), dtype=dt)  # change of the error W − Ŵ in this block
            block_change = torch.zeros(rows, dtype=dt)
            for k in range(b0, b1):
                hkk = float(hdiag[k])
                if hkk <= 0:  # a column H ignores: any level is as good
                    continue
                g = gt[k] + h[k, b0:k] @ delta[: k - b0] if k > b0 else gt[k]
                s = st[group_of[k]]
                q = nearest_code((w_hat[k] + g / hkk) / s + zero, fmt)
                new = (q - zero) * s
                dk = torch.sub(w_hat[k], new, out=delta[k - b0])
                block_change += (2 * g + hkk * dk) * dk  # exact change of e H eᵀ for this coordinate move
                w_hat[k] = new
                ct[k] = q.to(torch.uint8)
            gt.addmm_(h[:, b0:b1], delta)
            change += block_change
    return ct.t().contiguous(), change


def greedy_passes(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, fmt: IntFormat,
                  group_size: int, passes: int, block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """`passes` rounds of QuIP's greedy coordinate descent on LDLQ codes; the proxy loss never increases."""
    return greedy_refine(w, h, codes, scales, fmt, group_size, passes, block_size)[0]
