"""QuIP for one linear layer (Chee et al. 2023): incoherence processing, then LDLQ with a scale search.

1. Inputs that never fire (diag H = 0) carry no signal: their weight columns are zeroed.
2. Optional diagonal rescaling (QuIP sec. 5): W̃ = W·diag(d), H̃ = diag(1/d)·H·diag(1/d) with
   d = (diag H / diag WᵀW)^(1/4), which evens out how much each input column matters before rotating.
3. Rotation: W' = U W̃ Vᵀ, H' = V H̃ Vᵀ with seeded randomized Hadamard transforms (incoherence.py).
4. H' is damped and factored once; LDLQ runs once per candidate scale and each row keeps the candidate with
   the least proxy loss (rows are independent given H). Optional greedy passes follow.

The proxy loss is invariant under the orthogonal rotation and the diagonal rescaling, so the loss computed
in the rotated space, with the damping taken back out, is the loss tr((Ŵ−W) H (Ŵ−W)ᵀ) of the effective weight
against the caller's H. It comes from LDLQ's LDL form, a sum of non-negative terms: exact where the direct
product E·H·Eᵀ in float32 would cancel badly on an ill-conditioned H, and free where that product costs as
much as LDLQ itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats
from ..errors import LowbitError
from ..formats import IntFormat
from .incoherence import Transform, layer_seed
from .ldlq import LDL, all_finite, check_hessian, damp_hessian, greedy_refine, ldlq_factored
from .records import QuantizedLinear
from .rtn import search_scales

# Candidate scales, as multiples of the per-group MSE-optimal (round-to-nearest) scale. LDLQ's feedback
# widens the values it rounds, so it favors slightly larger scales than RTN, more so at fewer bits; close
# candidates still pay off because each row keeps the best of several LDLQ outcomes. 1.0 is always a
# candidate, so the search never does worse than no search.
SCALE_GRID = {
    2: (1.0, 1.05, 1.1, 1.15, 1.2),
    3: (0.95, 1.0, 1.05, 1.1, 1.15),
    4: (0.9, 0.95, 1.0, 1.05, 1.1),
    8: (0.95, 1.0, 1.05),
}
_SCALE_ROWS = 128  # rows per call of search_scales: its temporaries then stay in cache (same result)


def _where(fqn: str) -> str:
    return f"layer {fqn}: " if fqn else ""


def _check_weight(w: torch.Tensor, fqn: str) -> None:
    if w.dim() != 2:
        raise LowbitError(f"{_where(fqn)}expected a 2-D linear weight, got shape {tuple(w.shape)}")
    if not all_finite(w):
        raise LowbitError(f"{_where(fqn)}weight has NaN or Inf values; fix the model weights, or keep the "
                          f"layer in float with a per-layer override")


def rescale_factors(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """QuIP's d = (diag H / diag WᵀW)^(1/4) (float64), 1 where either is zero, geometric mean 1."""
    hd = h.diagonal().to(torch.float64)
    wn = w.to(torch.float64).square().sum(dim=0)
    ok = (hd > 0) & (wn > 0)
    d = torch.ones_like(hd)
    if bool(ok.any()):
        d[ok] = (hd[ok] / wn[ok]).pow(0.25)
        d[ok] /= d[ok].log().mean().exp()  # the overall scale is arbitrary; keep values near 1
    return d


def mse_scales(w: torch.Tensor, fmt: IntFormat, group_size: int) -> torch.Tensor:
    """rtn.search_scales, a block of rows at a time (rows are independent)."""
    return torch.cat([search_scales(c, fmt, group_size) for c in w.split(_SCALE_ROWS)])


def _undamped_rows(loss: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   fmt: IntFormat, group_size: int, extra: torch.Tensor) -> torch.Tensor:
    """Per-row loss under H from the loss under H + diag(extra) (the damping is diagonal)."""
    e = w - formats.dequantize(codes, scales, fmt, group_size).to(w.dtype)
    return loss - (e.square() @ extra.to(e.dtype)).to(torch.float64)


def ldlq_scale_search(w: torch.Tensor, ldl: LDL, extra: torch.Tensor, fmt: IntFormat, group_size: int,
                      grid: tuple[float, ...] = (1.0,)):
    """LDLQ for each candidate scale (MSE scale × grid); per row, keep the one with the least proxy loss.

    `ldl` factors the damped H = H₀ + diag(extra); rows are compared on the loss under H₀. Returns
    (codes, scales, per-row loss under the damped H, per-row loss under H₀).
    """
    base = mse_scales(w, fmt, group_size)
    best = None
    for m in grid:
        scales = base if m == 1.0 else formats.round_scales(base.float() * m)
        codes, damped = ldlq_factored(w, ldl, scales, fmt, group_size)
        cand = (codes, scales, damped, _undamped_rows(damped, w, codes, scales, fmt, group_size, extra))
        if best is None:
            best = cand
            continue
        better = cand[3] < best[3]
        best = tuple(torch.where(better.view(-1, *[1] * (c.dim() - 1)), c, b) for c, b in zip(cand, best))
    return best


def _check_inputs(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, rotate: bool, rescale: bool,
                  fqn: str) -> IntFormat:
    _check_weight(w, fqn)
    check_hessian(h, w.shape[1], fqn)
    fmt = formats.int_format(bits)
    try:
        formats.num_groups(w.shape[1], group_size)
    except LowbitError as e:
        raise LowbitError(f"{_where(fqn)}{e}") from None
    if rescale and not rotate:
        raise LowbitError(f"{_where(fqn)}rescale=True needs rotate=True: the scaling is stored in the input "
                          f"sign vector of the rotation")
    return fmt


def _to_quantization_space(w: torch.Tensor, h: torch.Tensor, transform: Transform | None, rescale: bool):
    """(W', H' float64, d or None): dead input columns zeroed, optionally rescaled, then rotated."""
    w = w.clone()
    w[:, h.diagonal() == 0] = 0  # inputs that never fire carry no signal
    d = rescale_factors(w, h) if rescale else None
    if d is not None:
        w = (w * d).to(torch.float32)
        h = h / d[:, None] / d[None, :]
    if transform is not None:
        # float32 is ample for H here: LDLQ sees H only to within the damping (1% of its mean diagonal, far
        # above float32 rounding), and float32 is 2.5x faster at 11008 inputs
        w, h = transform.rotate_weight(w), transform.rotate_hessian(h.to(torch.float32)).to(torch.float64)
    return w, h, d


@dataclass
class _Space:
    """A layer in the space LDLQ works in: what every bit width of one (rotate, rescale, damp, seed) shares."""

    wq: torch.Tensor  # W' float32, dead columns zeroed
    extra: torch.Tensor  # what damping added to diag H', taken back out of the loss
    ldl: LDL  # factor of the damped H', U cast to float32 once for all scale candidates
    h_damped: torch.Tensor | None  # float64 damped H', kept for greedy passes only (n² doubles)
    t: Transform | None
    d: torch.Tensor | None
    s: int | None


def _space(w0: torch.Tensor, h: torch.Tensor, rotate: bool, seed: int, rescale: bool, damp: float, greedy: bool,
           fqn: str) -> _Space:
    out_f, in_f = w0.shape
    t, s = None, None
    if rotate:
        s = layer_seed(seed, fqn)
        try:
            t = Transform.from_seed(in_f, out_f, s)
        except LowbitError as e:
            raise LowbitError(f"{_where(fqn)}{e}") from None
    wq, hq, d = _to_quantization_space(w0, h.detach().to(torch.float64), t, rescale)
    dh = damp_hessian(hq, damp, fqn)
    wq[:, dh.dead] = 0
    extra = dh.h.diagonal() - hq.diagonal()
    return _Space(wq, extra, LDL(dh.ldl.u.to(torch.float32), dh.ldl.d), dh.h if greedy else None, t, d, s)


def quantize_quip(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 0, *, rotate: bool = True,
                  seed: int = 0, rescale: bool = False, greedy: int = 0, damp: float = 0.01,
                  scale_search: bool = True, fqn: str = "", spaces: dict | None = None) -> QuantizedLinear:
    """Quantize one linear weight (out_features, in_features) given its input Hessian H = E[x xᵀ].

    rotate=False is plain OPTQ (the baseline). The transform seed is layer_seed(seed, fqn), as for RTN.
    With rescale, the record's su holds signs / d, so the runtime input transform also undoes the scaling.
    `spaces`: a dict the caller keeps for one (w, h) across calls (mixed precision measuring every bit width of a
    layer): the rotated, damped and factored layer is computed once per (rotate, rescale, damp, seed) and reused,
    with the same result as computing it again.
    """
    fmt = _check_inputs(w, h, bits, group_size, rotate, rescale, fqn)
    out_f, in_f = w.shape
    w0 = w.detach().to(torch.float32)
    key = (fqn, tuple(w.shape), rotate, seed, rescale, damp, greedy > 0)  # fqn, shape: a dict reused by mistake
    sp = spaces.get(key) if spaces is not None else None
    if sp is None:
        sp = _space(w0, h, rotate, seed, rescale, damp, greedy > 0, fqn)
        if spaces is not None:
            spaces[key] = sp
    wq, extra, ldl, t, d, s = sp.wq, sp.extra, sp.ldl, sp.t, sp.d, sp.s
    h_damped = sp.h_damped if greedy else None
    grid = SCALE_GRID[bits] if scale_search else (1.0,)
    codes, scales, damped, loss = ldlq_scale_search(wq, ldl, extra, fmt, group_size, grid)
    if greedy:
        codes, change = greedy_refine(wq, h_damped, codes, scales, fmt, group_size, greedy)
        loss = _undamped_rows(damped + change, wq, codes, scales, fmt, group_size, extra)
    su = None if t is None else (t.su.clone() if d is None else (t.su / d).to(torch.float32))
    rec = QuantizedLinear(  # own sign vectors: records of one cached space must not share tensors (fine-tuning)
        fqn=fqn, method="quip" if rotate else "optq", bits=bits, in_features=in_f, out_features=out_f,
        group_size=group_size, qweight=formats.pack(codes, bits), scales=scales, seed=s, su=su,
        sv=None if t is None else t.sv.clone(), weight_error=0.0, proxy_loss=float(loss.sum()),
    )
    err = torch.linalg.vector_norm(rec.dequantized_weight() - w0) / torch.linalg.vector_norm(w0).clamp_min(1e-30)
    rec.weight_error = float(err)
    return rec
