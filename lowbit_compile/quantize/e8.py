"""Block LDLQ with E8 lattice codebooks (QuIP#, Tseng et al. 2024, sec. 4): 8 columns at a time, one codeword each.

`quantize_e8_linear` is the layer quantizer (incoherence, then block LDLQ, then the record); the rest works on
weights and Hessians already in the incoherence-processed basis.

Conventions as in ldlq.py: W is (rows, n), H = E[x xᵀ] is (n, n), the proxy loss is tr((Ŵ−W) H (Ŵ−W)ᵀ), rows are
independent given H and each row has one scale s: Ŵ_row = s · fmt.dequantize(codes_row). But for
`quantize_e8_linear`, W and H are expected in the incoherence-processed basis (quantize.incoherence).

Block LDL: H = U D Uᵀ with U unit block upper triangular (8×8 identity diagonal blocks) and D block diagonal
with 8×8 positive definite blocks D_K. Block K (columns 8K..8K+7) is rounded after the feedback of the errors
already made on the blocks before it:

    A_K = W_K + (W − Ŵ)_{:,<K} Ů_{<K,K},    Ŵ_K = s · Q(A_K / s),

and the proxy loss is Σ_K (A_K − Ŵ_K) D_K (A_K − Ŵ_K)ᵀ, a sum of non-negative terms, for free. Q is the nearest
codeword in the Euclidean norm, as in QuIP# (the D_K norm would need a search per block). With H = I the
feedback is zero and block LDLQ is nearest rounding. The factor comes from the scalar LDL factor of ldlq.py:
U_scalar = U · U_diag with U_diag its 8×8 diagonal blocks, so U = U_scalar U_diag⁻¹ and D_K = U_KK diag(d_K) U_KKᵀ.

n must be a multiple of 8 (a LowbitError otherwise): padding would change the stored shape and the rotation, so it
is the caller's decision (zero weight columns with unit Hessian rows cost nothing in the loss).

Scales: per row, the base s₀ = rms(row) / fmt.gaussian_scale (the MSE optimum for Gaussian rows), then each
candidate s₀·m of the grid runs block LDLQ once and each row keeps the candidate with the least proxy loss, as
quip.ldlq_scale_search does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats
from ..errors import LowbitError
from ..formats import e8p
from ..formats.e8p import DIM, E8Format
from .incoherence import Transform, layer_seed
from .ldlq import LDL, check_hessian, damp_hessian
from .records import E8QuantizedLinear

DEFAULT_BLOCK = 128  # columns per lazy feedback GEMM (16 codeword blocks), as ldlq.DEFAULT_BLOCK
STACK_ROWS = 4096  # scale candidates run stacked up to this many rows per block LDLQ pass
# Multiples of the Gaussian-optimal scale tried per row. As with scalar LDLQ, feedback widens the values to round,
# so at 2 bits rows prefer scales 5-15% above the MSE optimum; with a residual stage, which covers what the first
# one clips, they stay near it. Grids centred on what the rows of all-MiniLM-L6-v2 chose; 1.0 is always one.
SCALE_GRID = {
    2: (1.0, 1.05, 1.1, 1.15, 1.2),
    3: (0.9, 0.95, 1.0, 1.05, 1.1),
    4: (0.9, 0.95, 1.0, 1.05, 1.1),
}


def _where(fqn: str) -> str:
    return f"layer {fqn}: " if fqn else ""


@dataclass(frozen=True)
class BlockLDL:
    """H = U D Uᵀ: u (n, n) unit block upper triangular, d (n/8, 8, 8) the diagonal blocks (float64)."""

    u: torch.Tensor
    d: torch.Tensor


@dataclass(frozen=True)
class E8Result:
    """codes (rows, n/8, stages) int32, scales (rows, 1) float16, loss (rows,) float64 under the caller's H
    (for the nearest quantizer: the squared error, i.e. H = I); `damped` the loss under the damped H."""

    fmt: E8Format
    codes: torch.Tensor
    scales: torch.Tensor
    loss: torch.Tensor
    damped: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """Ŵ (rows, n) float32."""
        rows = self.codes.shape[0]
        return (self.fmt.dequantize(self.codes).reshape(rows, -1) * self.scales.float()).contiguous()


def _check_width(n: int, fqn: str) -> None:
    if n % DIM:
        raise LowbitError(f"{_where(fqn)}E8 codebooks quantize {DIM} weights at a time, but the weight has {n} "
                          f"input columns; pad them to a multiple of {DIM} or use a scalar format for this layer")


def block_ldl(ldl: LDL) -> BlockLDL:
    """The 8×8 block LDL factor of U diag(d) Uᵀ (float64)."""
    u = ldl.u.to(torch.float64)
    n = u.shape[0]
    _check_width(n, "")
    nb = n // DIM
    idx = torch.arange(nb)
    diag = u.view(nb, DIM, nb, DIM)[idx, :, idx, :]  # (nb, 8, 8) unit upper triangular blocks
    inv = torch.linalg.solve_triangular(diag, torch.eye(DIM, dtype=torch.float64).expand(nb, -1, -1), upper=True,
                                        unitriangular=True)
    ub = torch.einsum("ikj,kjl->ikl", u.view(n, nb, DIM), inv).reshape(n, n)
    ub.view(nb, DIM, nb, DIM)[idx, :, idx, :] = torch.eye(DIM, dtype=torch.float64)  # exactly, not to rounding
    d = diag * ldl.d.to(torch.float64).view(nb, 1, DIM) @ diag.transpose(1, 2)
    return BlockLDL(ub, d)


def base_scales(w: torch.Tensor, fmt: E8Format) -> torch.Tensor:
    """Per-row float16 scales rms(row) / fmt.gaussian_scale, shape (rows, 1)."""
    rms = w.to(torch.float32).square().mean(dim=-1, keepdim=True).sqrt()
    return formats.round_scales(rms / fmt.gaussian_scale)


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32


def e8_ldlq_factored(w: torch.Tensor, bldl: BlockLDL, scales: torch.Tensor, fmt: E8Format,
                     block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDLQ codes (rows, n/8, stages) int32 for fixed scales (rows, 1), and the per-row proxy loss
    (float64) under U D Uᵀ."""
    rows, n = w.shape
    _check_width(n, "")
    if bldl.u.shape[0] != n:
        raise LowbitError(f"Hessian is {bldl.u.shape[0]} x {bldl.u.shape[0]} but the weight has {n} input columns")
    if block_size < DIM or block_size % DIM:
        raise LowbitError(f"block_size must be a positive multiple of {DIM}, got {block_size}")
    dt = _work_dtype(w)
    s = scales.to(dt).reshape(1, rows)
    # Transposed layout: column k of W is the contiguous row k, so every block step is contiguous.
    wt = w.to(dt).t().contiguous()
    ut = bldl.u.t().to(dt)  # ut[k, j] = Ů[j, k] for j in blocks before k's
    d = bldl.d.to(dt)
    et = torch.empty_like(wt)  # W − Ŵ
    codes = torch.empty((n // DIM, rows, fmt.stages), dtype=torch.int32)
    loss = torch.zeros(rows, dtype=torch.float64)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        # feedback from all earlier column blocks in one GEMM; from this block's codewords one GEMM each
        at = torch.addmm(wt[b0:b1], ut[b0:b1, :b0], et[:b0]) if b0 else wt[b0:b1].clone()
        for k in range(b0, b1, DIM):
            a = at[k - b0:k - b0 + DIM]
            if k > b0:
                a.addmm_(ut[k:k + DIM, b0:k], et[b0:k])
            c, v = fmt.quantize((a / s).t())
            codes[k // DIM] = c
            w_hat = v.t().to(dt).mul_(s)
            torch.sub(wt[k:k + DIM], w_hat, out=et[k:k + DIM])
            a.sub_(w_hat)  # A_K − Ŵ_K, for the loss
        r = at.view(-1, DIM, rows)
        loss += (r * torch.bmm(d[b0 // DIM:b1 // DIM], r)).sum(dim=(0, 1)).to(torch.float64)
    return codes.permute(1, 0, 2).contiguous(), loss


def _undamped_rows(damped: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   fmt: E8Format, extra: torch.Tensor) -> torch.Tensor:
    """Per-row loss under H from the loss under H + diag(extra) (the damping is diagonal)."""
    e = w - (fmt.dequantize(codes).reshape(w.shape[0], -1) * scales.float()).to(w.dtype)
    return damped - (e.square() @ extra.to(e.dtype)).to(torch.float64)


def _keep_better(best, cand):
    if best is None:
        return cand
    better = cand[3] < best[3]
    return tuple(torch.where(better.view(-1, *[1] * (c.dim() - 1)), c, b) for c, b in zip(cand, best))


def e8_ldlq_scale_search(w: torch.Tensor, bldl: BlockLDL, extra: torch.Tensor, fmt: E8Format,
                         grid: tuple[float, ...] = (1.0,), block_size: int = DEFAULT_BLOCK):
    """Block LDLQ for each candidate scale base_scales(w)·m; per row, keep the one with the least proxy loss.

    `bldl` factors the damped H = H₀ + diag(extra); rows are compared on the loss under H₀. Candidates run
    stacked as extra rows, up to STACK_ROWS rows per pass: the encoder's cost per call is largely fixed, so a
    small layer's candidates together cost little more than one. Returns (codes, scales, per-row loss under the
    damped H, per-row loss under H₀).
    """
    rows = w.shape[0]
    base = base_scales(w, fmt)
    cands = [base if m == 1.0 else formats.round_scales(base.float() * m) for m in grid]
    per_pass = max(1, STACK_ROWS // rows)
    best = None
    for i in range(0, len(cands), per_pass):
        group = cands[i:i + per_pass]
        codes, damped = e8_ldlq_factored(w.repeat(len(group), 1), bldl, torch.cat(group), fmt, block_size)
        for j, scales in enumerate(group):
            c, dmp = codes[j * rows:(j + 1) * rows], damped[j * rows:(j + 1) * rows]
            best = _keep_better(best, (c, scales, dmp, _undamped_rows(dmp, w, c, scales, fmt, extra)))
    return best


def _check_weight(w: torch.Tensor, fqn: str) -> None:
    if w.dim() != 2:
        raise LowbitError(f"{_where(fqn)}expected a 2-D weight, got shape {tuple(w.shape)}")
    _check_width(w.shape[1], fqn)


def quantize_e8(w: torch.Tensor, h: torch.Tensor, bits: int, *, damp: float = 0.01, scale_search: bool = True,
                block_size: int = DEFAULT_BLOCK, fqn: str = "") -> E8Result:
    """Block LDLQ of an incoherence-processed weight (rows, n) with its Hessian H (n, n) in the same basis.

    Inputs that never fire (diag H = 0) have their columns zeroed, as in quip.py. Works in float32 (float64
    when w is float64); the factorization is float64.
    """
    fmt = e8p.e8_format(bits)
    _check_weight(w, fqn)
    check_hessian(h, w.shape[1], fqn)
    w = w.detach().to(_work_dtype(w), copy=True)
    h = h.detach().to(torch.float64)
    dh = damp_hessian(h, damp, fqn)
    w[:, dh.dead] = 0
    extra = dh.h.diagonal() - h.diagonal()  # what damping added, taken back out of the loss
    bldl = block_ldl(dh.ldl)
    del dh
    grid = SCALE_GRID[bits] if scale_search else (1.0,)
    codes, scales, damped, loss = e8_ldlq_scale_search(w, bldl, extra, fmt, grid, block_size)
    return E8Result(fmt, codes, scales, loss, damped)


def quantize_e8_nearest(w: torch.Tensor, bits: int, *, scale_search: bool = True,
                        scales: torch.Tensor | None = None) -> E8Result:
    """Nearest-codeword rounding, 8 columns at a time (block LDLQ with H = I): scales fixed, or per row the
    candidate of the grid with the least squared error. loss = damped = the per-row squared error."""
    fmt = e8p.e8_format(bits)
    _check_weight(w, "")
    rows = w.shape[0]
    wf = w.detach().to(_work_dtype(w))
    if scales is not None:
        grid, base = (1.0,), scales.reshape(rows, 1)
    else:
        grid, base = (SCALE_GRID[bits] if scale_search else (1.0,)), base_scales(wf, fmt)
    best = None
    for m in grid:
        sc = base if m == 1.0 else formats.round_scales(base.float() * m)
        codes, v = fmt.quantize((wf / sc.to(wf.dtype)).reshape(rows, -1, DIM))
        err = (wf - v.reshape(rows, -1).to(wf.dtype) * sc.to(wf.dtype)).square().sum(dim=-1).to(torch.float64)
        best = _keep_better(best, (codes, sc, err, err))
    codes, sc, err, _ = best
    return E8Result(fmt, codes, sc, err, err)


def quantize_e8_linear(w: torch.Tensor, h: torch.Tensor, bits: int, *, seed: int = 0, damp: float = 0.01,
                       fqn: str = "") -> E8QuantizedLinear:
    """One linear weight (out_features, in_features) with its input Hessian H = E[x xᵀ] -> an E8QuantizedLinear:
    incoherence as in QuIP (dead input columns zeroed, then W' = U W Vᵀ, H' = V H Vᵀ with the transform of
    layer_seed(seed, fqn)), then block LDLQ with the scale search (`quantize_e8`). The proxy loss is under the
    caller's H (the rotation leaves it unchanged)."""
    from .quip import _to_quantization_space

    if w.dim() != 2:
        raise LowbitError(f"{_where(fqn)}expected a 2-D linear weight, got shape {tuple(w.shape)}")
    _check_width(w.shape[1], fqn)
    check_hessian(h, w.shape[1], fqn)
    out_f, in_f = w.shape
    w0 = w.detach().to(torch.float32)
    s = layer_seed(seed, fqn)
    try:
        t = Transform.from_seed(in_f, out_f, s)
    except LowbitError as e:
        raise LowbitError(f"{_where(fqn)}{e}") from None
    wq, hq, _ = _to_quantization_space(w0, h.detach().to(torch.float64), t, rescale=False)
    res = quantize_e8(wq, hq, bits, damp=damp, fqn=fqn)
    rec = E8QuantizedLinear(
        fqn=fqn, method="e8", bits=bits, in_features=in_f, out_features=out_f, group_size=0,
        qweight=e8p.pack_codes(res.codes, res.fmt), scales=res.scales, seed=s, su=t.su, sv=t.sv, weight_error=0.0,
        proxy_loss=float(res.loss.sum()),
    )
    err = torch.linalg.vector_norm(rec.dequantized_weight() - w0) / torch.linalg.vector_norm(w0).clamp_min(1e-30)
    rec.weight_error = float(err)
    return rec
