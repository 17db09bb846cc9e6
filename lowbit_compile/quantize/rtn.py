"""Round-to-nearest with a per-group clipping search: the data-free quantizer and the baseline for LDLQ."""

from __future__ import annotations

import torch

from .. import formats
from ..formats import IntFormat
from .ldlq import nearest_code

# Fractions of the max-abs scale tried per group. Low bit widths want strong clipping: for a Gaussian row
# of a few hundred entries the MSE-optimal 2-bit scale is about half the max-abs one.
CLIP_GRID = tuple(round(0.2 + 0.05 * i, 2) for i in range(17))  # 0.20 .. 1.00


def search_scales(w: torch.Tensor, fmt: IntFormat, group_size: int,
                  clip_grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Per-group float16 scales minimizing the squared rounding error of w (rows, in_features)."""
    rows, k = w.shape
    g = formats.num_groups(k, group_size)
    wg = w.to(torch.float32).reshape(rows, g, k // g)
    amax = wg.abs().amax(dim=-1)
    best_err = torch.full((rows, g), float("inf"))
    best = formats.round_scales(amax / fmt.half_range)
    # One buffer, in-place steps, and rounding as clamp + add/subtract 1.5·2^23 (ldlq.nearest_code): the bounds
    # are integers, so clamping before rounding gives round-then-clamp's codes, without torch.round's slow
    # vectorized-math kernel. The same errors bit for bit as the plain expression, 3-5x faster.
    q = torch.empty_like(wg)
    for alpha in clip_grid:
        s = formats.round_scales(alpha * amax / fmt.half_range)
        sf = s.float().unsqueeze(-1)
        torch.div(wg, sf, out=q)
        err = nearest_code(q.add_(fmt.zero), fmt).sub_(fmt.zero).mul_(sf).sub_(wg).square_().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def quantize_rtn(w: torch.Tensor, fmt: IntFormat, group_size: int, clip_search: bool = True):
    """(codes uint8 (rows, in_features), scales float16 (rows, groups))."""
    grid = CLIP_GRID if clip_search else (1.0,)
    scales = search_scales(w, fmt, group_size, grid)
    return formats.quantize_codes(w, scales, fmt, group_size), scales
