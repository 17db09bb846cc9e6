"""LLM-FP4 (Liu et al. 2023) on tensors: per-layer format and clipping search, per-channel act. exponents.

For one linear y = x Wᵀ with calibration inputs x (tokens, in_features) the search picks

- a weight format (E2M1, E1M2 or E3M0) and one exponent bias per output row,
- an activation format and ONE exponent bias for the whole tensor (skipped in W4A16 mode),

minimizing the layer-output error ||Q(x) Q(W)ᵀ - x Wᵀ||². Biases are searched as clipped max-scaled
biases, b = max_scaled_bias - log2(γ) for γ on a grid of ~100 points in [0.01, 1.2] (plus γ = 1), with
rounds of "weight step, then activation step" (each step keeps the best of its candidates). Each step
scans the grid coarse to fine (every 7th point, then the neighbours of the best; per row for weights),
28 candidates instead of 101 (the losses found agree to ~0.1 %). A step whose input repeats an earlier round's
(the same activation scale, or the same weight format and row scales) is not recomputed: its result is the
same, so once the scales stop changing the remaining rounds are free. Weight and activation formats may
differ. The search starts from, and returns nothing worse than, max-scaled E2M1 (its loss is reported as
`baseline_loss`).

Pre-shifted exponents (LLM-FP4 §4.2): channel c of the activations gets an integer exponent shift
k_c in [0, 2**E - 1] (E of the activation format), so it is quantized at bias ρ + k_c. Because
Q_{ρ+k}(x) = 2**-k Q_ρ(2**k x) holds exactly, this is computed as x' = x·2**k (a per-channel power of two,
later folded into the producer of x: a norm's weight and bias, or a preceding linear's output rows),
quantized per tensor at bias ρ, against W' = W·2**-k (columns) quantized per row; x'·W'ᵀ = x·Wᵀ.

Stored representation of an FP4 linear (`FP4LinearQuant`, and the arguments of `lowbit::fp4_linear`):
- qweight       uint8 (out_features, ceil(in_features / 2)): FP4 codes of W' = W·2**-k, two per byte,
                element 0 in the low nibble (formats.fp4.pack_codes)
- w_scales      float16 (out_features, 1): per-row scale 2**-bias (bias = the LLM-FP4 real exponent bias)
- act_scale     float16 (1,): per-tensor activation scale 2**-ρ; None in W4A16 mode
- act_exponents uint8 (in_features,): k, or None when no channel is shifted
plus the format names (w_format, a_format; a_format None in W4A16 mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LowbitError
from ..formats import fp4 as f4
from ..formats.fp4 import FP4Format, exponent_multipliers

# LLM-FP4's clipping grid: 100 points of [0.01, 1.2], plus 1.0 so the max-scaled bias is always a candidate.
CLIP_GRID = tuple(sorted({round(0.01 + i * 1.19 / 99, 6) for i in range(100)} | {1.0}))
ALL_FORMATS = ("e2m1", "e1m2", "e3m0")
# Grids longer than this are searched coarse to fine (`_coarse_to_fine`).
COARSE_POINTS = 16
# Alternating weight/activation rounds (LLM-FP4 uses 3). quantize.layer reads CLIP_GRID and SEARCH_ROUNDS at
# call time, so tests can shorten both.
SEARCH_ROUNDS = 3
# The unsearched quantizer the search is compared with: E2M1 (OCP FP4) at the max-scaled bias.
BASELINE_FORMAT = "e2m1"


@dataclass
class FP4LinearQuant:
    """One FP4-quantized linear (see the module docstring for the stored tensors)."""

    fqn: str
    w_format: FP4Format
    a_format: FP4Format | None
    qweight: torch.Tensor
    w_scales: torch.Tensor
    act_scale: torch.Tensor | None
    act_exponents: torch.Tensor | None
    in_features: int
    loss: float = math.nan           # mean of (Q(x)Q(W)ᵀ - xWᵀ)² over the calibration tokens and outputs
    baseline_loss: float = math.nan  # the same for E2M1 max-scaled weights (and activations), no shifts
    notes: list[str] = field(default_factory=list)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def w_bias(self) -> torch.Tensor:
        """Per-row real exponent bias, float32 (out_features,)."""
        return f4.scale_to_bias(self.w_scales.squeeze(1))

    @property
    def act_bias(self) -> float | None:
        """The per-tensor activation bias ρ (channel c is effectively at ρ + k_c)."""
        return None if self.act_scale is None else float(f4.scale_to_bias(self.act_scale))

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ' float32 (out, in): the decoded codes, in shifted coordinates (what lowbit::fp4_linear uses)."""
        codes = f4.unpack_codes(self.qweight, self.in_features)
        return f4.decode(codes, self.w_format, self.w_scales)

    def effective_weight(self) -> torch.Tensor:
        """Ŵ'·2**k (columns): the quantized weight in the original coordinates of x."""
        w = self.dequantized_weight()
        return w if self.act_exponents is None else w * exponent_multipliers(self.act_exponents)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x·2**k) float32, the activations the op multiplies (x itself in W4A16 mode)."""
        x = x.to(torch.float32)
        if self.act_exponents is not None:
            x = x * exponent_multipliers(self.act_exponents)
        return x if self.a_format is None else f4.quantize(x, self.a_format, self.act_scale)


# ---------------------------------------------------------------- per-channel activation exponents


def channel_exponents(channel_amax: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    """Per-channel exponent shifts k (uint8, one per channel) from per-channel |x| maxima.

    k_c = floor(log2(max_c' amax / amax_c)) clamped to [0, 2**E - 1]: the largest shift with
    2**k_c·amax_c <= the tensor maximum, so no channel is pushed past the range the per-tensor bias covers
    and the shifted tensor keeps the same maximum (the paper rounds instead of flooring; flooring also
    keeps fp16 activations from overflowing once the shift is folded into the producer). Channels whose
    maximum is 0 get k = 0.
    """
    a = channel_amax.detach().to(torch.float64).abs()
    if a.dim() != 1:
        raise LowbitError(f"channel_exponents expects a 1-D tensor of channel maxima, got {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise LowbitError("channel_exponents: a channel maximum is NaN or Inf; check the calibration data")
    top = a.max() if a.numel() else torch.tensor(0.0, dtype=torch.float64)
    live = a > 0
    ratio = torch.where(live, top / torch.where(live, a, torch.ones_like(a)), torch.ones_like(a))
    k = torch.floor(torch.log2(ratio)).clamp(0, fmt.max_exponent_shift)
    # log2 may round up across a power of two: step back where 2**k·amax would exceed the maximum.
    k = torch.where(torch.ldexp(a, k) > top, k - 1, k).clamp(min=0)
    return k.to(torch.uint8)


def apply_channel_exponents(x: torch.Tensor | None, w: torch.Tensor | None, k: torch.Tensor):
    """(x·2**k on the last dim, W·2**-k on the columns), float32; either may be None. Exact: powers of two."""
    m = exponent_multipliers(k)
    xs = None if x is None else x.to(torch.float32) * m
    ws = None if w is None else w.to(torch.float32) / m
    return xs, ws


# ---------------------------------------------------------------- input checks


def check_inputs(fqn: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise LowbitError(f"layer {fqn}: expected a 2-D linear weight, got shape {tuple(w.shape)}")
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(w).sum())
        raise LowbitError(
            f"layer {fqn}: weight has {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values; fix the "
            f"model weights, or keep the layer in float with overrides={{{fqn!r}: None}}"
        )
    in_f = w.shape[1]
    if x.shape[-1] != in_f:
        raise LowbitError(f"layer {fqn}: calibration inputs have {x.shape[-1]} features, the weight "
                          f"expects {in_f}")
    x = x.detach().reshape(-1, in_f)
    if x.shape[0] == 0:
        raise LowbitError(f"layer {fqn}: no calibration tokens reached this layer; pass calibration batches")
    bad = ~torch.isfinite(x).all(dim=0)
    if bool(bad.any()):
        chans = bad.nonzero().flatten().tolist()
        kind = "Inf" if bool(torch.isinf(x[:, chans[0]]).any()) else "NaN"
        raise LowbitError(
            f"layer {fqn}: calibration activations of input channel {chans[0]} contain {kind} "
            f"({len(chans)} channel(s) affected: {chans[:8]}); check the calibration data (an overflowing "
            f"earlier layer in float16, or a bad batch)"
        )
    return x


# ---------------------------------------------------------------- search steps


class _Layer:
    """Calibration data of one layer in shifted coordinates, and the exact loss."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, k: torch.Tensor | None, y64: torch.Tensor):
        self.k = k
        if k is None:
            self.x, self.w = x.to(torch.float32), w.to(torch.float32)
        else:
            self.x, self.w = apply_channel_exponents(x, w, k)
        self.y64 = y64

    def exact_loss(self, xq: torch.Tensor, wq: torch.Tensor) -> float:
        r = xq.to(torch.float64) @ wq.to(torch.float64).T - self.y64
        return float(r.pow(2).mean())


def _coarse_to_fine(n: int):
    """Indices of a coarse pass over a sorted grid of n points and the half-width of the refinement after it.

    With more than COARSE_POINTS points the search evaluates every step-th point, then the step - 1 points
    on each side of the best one: about 2·sqrt(n)-ish candidates instead of n (28 of the 101-point grid).
    The clipping objective is smooth at this resolution, and the final comparison with the start point
    is exact, so the never-worse guarantee does not depend on it.
    """
    step = max(1, -(-n // COARSE_POINTS))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx, step


def _scan_rows(row_errors, fmt, scales: torch.Tensor, start: torch.Tensor, coarse, step):
    """Each row's smallest error and its scale among the candidates `scales` (rows, n): the columns `coarse`,
    then the step - 1 columns on each side of the row's best coarse one (clamped to the grid). A candidate
    replaces the row's best only when strictly better, so the first of equal errors is kept."""
    rows, n = scales.shape
    row_err = torch.full((rows,), math.inf)
    row_scale, row_idx = start, torch.zeros(rows, dtype=torch.long)

    def consider(idx, s):
        nonlocal row_err, row_scale, row_idx
        err = row_errors(fmt, s)
        better = err < row_err
        row_err = torch.where(better, err, row_err)
        row_scale = torch.where(better, s, row_scale)
        row_idx = torch.where(better, idx, row_idx)

    for i in coarse:
        consider(i, scales[:, i])
    if step > 1:
        centre = row_idx.clone()
        for j in range(1 - step, step):
            if j:
                idx = (centre + j).clamp(0, n - 1)
                consider(idx, scales.gather(1, idx.unsqueeze(1)).squeeze(1))
    return row_err, row_scale


def _weight_step(layer: _Layer, xq: torch.Tensor, w_formats, clip_grid):
    """Best weight format and per-row scales given the (fixed) quantized activations xq.

    Row r's error for a candidate is ||X̂ q_r - x w_r||² with d_r = q_r - w_r; it is computed as
    ||X̂ d_r + (X̂ - x) w_r||² from the tokens when there are fewer tokens than input features, else as
    d_rᵀ Ĥ d_r + 2 d_rᵀ G w_r + ||(X̂ - x) w_r||² with Ĥ = X̂ᵀX̂, G = X̂ᵀ(X̂ - x): the cheaper of the two.
    """
    x, w = layer.x, layer.w
    grid = torch.tensor(clip_grid, dtype=torch.float32)
    coarse, step = _coarse_to_fine(len(clip_grid))
    err_x = xq - x
    quantized_act = bool(err_x.abs().max() > 0) if err_x.numel() else False
    by_tokens = x.shape[0] < x.shape[1]
    if by_tokens:
        base = err_x @ w.T if quantized_act else None  # (tokens, out)
    else:
        hess = xq.T @ xq
        if quantized_act:
            cross = w @ (xq.T @ err_x).T          # row r: G w_r
            const = (err_x @ w.T).pow(2).sum(0)   # ||(X̂ - x) w_r||²
    amax = w.abs().amax(dim=1)

    def row_errors(fmt, s):
        d = f4.quantize(w, fmt, s.unsqueeze(1)).sub_(w)
        if by_tokens:
            e = xq @ d.T
            if quantized_act:
                e += base
            return e.pow_(2).sum(0)
        err = ((d @ hess).mul_(d)).sum(1)
        if quantized_act:
            err = err + 2 * (d.mul_(cross)).sum(1) + const
        return err

    best = None
    for fmt in w_formats:
        # every row's scale for every clip value at once: the same elementwise float32 operations as one
        # max_scaled_scale(amax, fmt, γ) call per candidate, so the same float16 scales
        scales = f4.max_scaled_scale(amax.unsqueeze(1), fmt, grid)  # (rows, len(clip_grid))
        row_err, row_scale = _scan_rows(row_errors, fmt, scales, f4.max_scaled_scale(amax, fmt), coarse, step)
        total = float(row_err.sum())
        if best is None or total < best[0]:
            best = (total, fmt, row_scale.unsqueeze(1))
    _, fmt, scales = best
    return fmt, scales, f4.quantize(w, fmt, scales)


def _act_step(layer: _Layer, wq: torch.Tensor, a_fmt: FP4Format, clip_grid):
    """Best per-tensor activation scale for a_fmt given the (fixed) quantized weight wq (coarse to fine)."""
    x = layer.x
    z = x @ (wq - layer.w).T
    amax = x.abs().max()
    tried: dict[float, tuple] = {}

    def consider(i):
        s = f4.max_scaled_scale(amax, a_fmt, clip_grid[i]).reshape(1)
        if float(s) not in tried:  # several γ can round to the same float16 scale
            xq = f4.quantize(x, a_fmt, s)
            tried[float(s)] = (float(((xq - x) @ wq.T + z).pow(2).sum()), i, s, xq)
        return tried[float(s)]

    coarse, step = _coarse_to_fine(len(clip_grid))
    best = min((consider(i) for i in coarse), key=lambda t: t[0])
    centre = best[1]
    for j in range(1 - step, step):
        i = centre + j
        if j and 0 <= i < len(clip_grid):
            cand = consider(i)
            if cand[0] < best[0]:
                best = cand
    return best[2], best[3]


def _result(fqn, layer: _Layer, w_fmt, w_scales, a_fmt, a_scale, in_f, loss) -> FP4LinearQuant:
    codes = f4.encode(layer.w, w_fmt, w_scales)
    k = layer.k if layer.k is not None and bool(layer.k.any()) else None
    return FP4LinearQuant(fqn=fqn, w_format=w_fmt, a_format=a_fmt, qweight=f4.pack_codes(codes),
                          w_scales=w_scales.clone(), act_scale=None if a_scale is None else a_scale.clone(),
                          act_exponents=k, in_features=in_f, loss=loss)


def _max_scaled(fqn, layer: _Layer, w_fmt: FP4Format, a_fmt: FP4Format | None) -> FP4LinearQuant:
    """Max-scaled biases (per row for W, per tensor for x) on the layer's (possibly shifted) coordinates."""
    w_scales = f4.max_scaled_scale(layer.w.abs().amax(dim=1), w_fmt).unsqueeze(1)
    wq = f4.quantize(layer.w, w_fmt, w_scales)
    a_scale, xq = None, layer.x
    if a_fmt is not None:
        a_scale = f4.max_scaled_scale(layer.x.abs().max(), a_fmt).reshape(1)
        xq = f4.quantize(layer.x, a_fmt, a_scale)
    return _result(fqn, layer, w_fmt, w_scales, a_fmt, a_scale, layer.w.shape[1], layer.exact_loss(xq, wq))


def max_scaled_fp4(x: torch.Tensor, w: torch.Tensor, *, fqn: str = "<layer>",
                   act_quant: bool = True) -> FP4LinearQuant:
    """The unsearched quantizer: E2M1 at the max-scaled bias (per row for W, per tensor for x), no shifts."""
    x = check_inputs(fqn, x, w)
    y64 = x.to(torch.float64) @ w.detach().to(torch.float64).T
    fmt = f4.fp4_format(BASELINE_FORMAT)
    res = _max_scaled(fqn, _Layer(x, w.detach(), None, y64), fmt, fmt if act_quant else None)
    res.baseline_loss = res.loss
    return res


def search_fp4_layer(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    fqn: str = "<layer>",
    act_quant: bool = True,
    w_formats=ALL_FORMATS,
    a_formats=ALL_FORMATS,
    channel_shift: bool = True,
    act_exponents: torch.Tensor | None = None,
    clip_grid=CLIP_GRID,
    rounds: int = SEARCH_ROUNDS,
) -> FP4LinearQuant:
    """LLM-FP4's per-layer search on calibration inputs x (..., in_features) for weight w (out, in).

    act_quant False is W4A16 (one weight step; activations stay float). channel_shift computes per-channel
    exponents from x for each activation format (`channel_exponents`); `act_exponents` fixes them instead,
    for every format (e.g. one k for all consumers of one norm: `channel_exponents(amax, fmt)` of the
    shared input), and the result then always uses them. The result is the best configuration evaluated,
    within the allowed formats: never worse than `max_scaled_fp4` on this data (reported as
    `baseline_loss`) when E2M1 is allowed and act_exponents are not fixed (else never worse than the
    max-scaled quantizer in the allowed formats on the shifted tensors).
    The cost is about (rounds x (3·|clip_grid| weight candidates of out·in² + |clip_grid| activation
    candidates of tokens·in·out)) per activation format: pass a token sample, not a whole calibration set.
    """
    x = check_inputs(fqn, x, w)
    w = w.detach()
    in_f = w.shape[1]
    w_formats = [f4.fp4_format(f) for f in w_formats]
    a_formats = [f4.fp4_format(f) for f in a_formats] if act_quant else [None]
    clip_grid = tuple(sorted(float(g) for g in clip_grid))
    if not w_formats or not a_formats or rounds < 1 or not clip_grid:
        raise LowbitError(f"layer {fqn}: the FP4 search needs at least one format, one round and one "
                          f"clip value")
    notes = []
    if not bool(x.abs().max() > 0):
        notes.append(f"layer {fqn}: calibration activations are all zero; the activation scale is set as if "
                     f"max|x| = 1 and the output error does not depend on it")
    if act_exponents is not None:
        if not act_quant:
            raise LowbitError(f"layer {fqn}: act_exponents only apply when activations are quantized")
        act_exponents = act_exponents.detach().reshape(-1)
        if act_exponents.numel() != in_f or bool((act_exponents < 0).any() | (act_exponents > 15).any()):
            raise LowbitError(f"layer {fqn}: act_exponents must be {in_f} integers in [0, 15], got "
                              f"{act_exponents.numel()} in [{act_exponents.min()}, {act_exponents.max()}]")
        act_exponents = act_exponents.to(torch.uint8)
    # The search starts from (and never ends worse than) max-scaled E2M1, or the first allowed format where
    # E2M1 is not allowed; in shifted coordinates when the caller fixed the shifts (the result must then
    # use them), else unshifted: with E2M1 allowed, that start is the baseline itself.
    y64 = x.to(torch.float64) @ w.to(torch.float64).T
    base_fmt = f4.fp4_format(BASELINE_FORMAT)
    baseline_loss = _max_scaled(fqn, _Layer(x, w, None, y64), base_fmt, base_fmt if act_quant else None).loss
    start_w = base_fmt if base_fmt in w_formats else w_formats[0]
    start_a = base_fmt if base_fmt in a_formats else a_formats[0]
    best = _max_scaled(fqn, _Layer(x, w, act_exponents, y64), start_w, start_a)
    channel_amax = x.abs().amax(dim=0)

    for a_fmt in a_formats:
        k = None
        if act_exponents is not None:
            k = act_exponents
        elif a_fmt is not None and channel_shift:
            k = channel_exponents(channel_amax, a_fmt)
        layer = _Layer(x, w, k, y64)
        xq, a_scale = layer.x, None
        if a_fmt is not None:
            a_scale = f4.max_scaled_scale(layer.x.abs().max(), a_fmt).reshape(1)
            xq = f4.quantize(layer.x, a_fmt, a_scale)
        # A weight step depends only on xq (so on the activation scale), an activation step only on the quantized
        # weight (format and row scales): a step whose input was seen in an earlier round gives the same result,
        # which is taken from there (once the scales stop changing, the remaining rounds cost nothing).
        weight_steps: dict = {}
        act_steps: dict = {}
        for _ in range(rounds if a_fmt is not None else 1):
            key = None if a_scale is None else float(a_scale)
            if key not in weight_steps:
                weight_steps[key] = _weight_step(layer, xq, w_formats, clip_grid)
            w_fmt, w_scales, wq = weight_steps[key]
            if a_fmt is not None:
                key = (w_fmt.name, w_scales.numpy().tobytes())
                if key not in act_steps:
                    act_steps[key] = _act_step(layer, wq, a_fmt, clip_grid)
                a_scale, xq = act_steps[key]
        loss = layer.exact_loss(xq, wq)
        if loss < best.loss:
            best = _result(fqn, layer, w_fmt, w_scales, a_fmt, a_scale, in_f, loss)
    best.baseline_loss = baseline_loss
    best.notes = notes
    return best
