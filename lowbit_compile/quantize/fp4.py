"""LLM-FP4 (Liu et al. 2023) on tensors: per-layer format and clipping search, per-channel act. exponents.

For one linear y = x Wᵀ with calibration inputs x (tokens, in_features) the search picks

- a weight format (E2M1, E1M2 or E3M0) and one exponent bias per output row,
- an activation format and ONE exponent bias for the whole tensor (skipped in W4A16 mode),

minimizing the layer-output error ||Q(x) Q(W)ᵀ - x Wᵀ||². Biases are searched as clipped max-scaled
biases, b = max_scaled_bias - log2(γ) for γ on a grid of ~100 points in [0.01, 1.2] (plus γ = 1), in turns of
"activation step, then weight step" (each step keeps the best of its candidates), starting from max-scaled E2M1
weights. The search is shaped by what its error curves look like (measured on MiniLM and SmolLM2 layers):

- A row's weight error against γ is jagged (neighbouring grid points differ by tens of percent: the rounding
  pattern changes with the scale), so each row is searched over many points: every 7th point of the grid,
  then every point within 6 of the row's best (28 candidates per row and format); only the weight formats
  whose coarse total is within FORMAT_MARGIN of the best are refined.
- The per-tensor activation error is smooth: its coarse pass runs from the top of the grid down and ends once
  the error has climbed past ACT_TURN_RATIO × the best (clipping error only grows from there), then a halving
  refinement; later activation steps search around the previous scale.
- The first activation step is against max-scaled weights, and the first weight step then sees nearly final
  activations; a weight step whose activation scale was seen before is not repeated, so on MiniLM and SmolLM2 a
  layer typically costs one activation step, one weight step and one local activation step. (Weights first, as
  before, starts from max-scaled activations far from the final ones: stopping after its first weight step
  lost ~6 % of output error on MiniLM, and a local second weight step ~4 %; it needed a second full one.)
- Formats are screened before they are searched (`screen_format`: one activation step and one coarse weight step
  on 96 of the weight rows): activation formats within ACT_FORMAT_MARGIN of the best screened error, and for
  each the weight formats within W_FORMAT_MARGIN of its best, are searched on all rows. On the 25 MiniLM and 38
  SmolLM2 `fp4` groups checked, the screen's best activation format was the one a full search of all three
  picks; on MiniLM's `fp4-rot` layers it was within 4.1 % of it (tools/fp4_search_ab.py A/Bs such changes).

Every candidate's error is computed from integers: an FP4 value at bias 0 times `int_mult(fmt)` is a small integer
(E2M1 0..12, E1M2 ×2 0..7, E3M0 ×½ 0..64), so Q(x)·Q(W)ᵀ = (ints_x · ints_Wᵀ) · s_x s_w / (mult_x mult_w) with the
sum exact in int32 (torch's int8 GEMM, 5-10× float32's speed with AVX-512 VNNI/AMX, ~1.6× with AVX2), and each
difference to y = x Wᵀ is one float32 rounding (`sq_err_rows`). Given y, the numbers are the same on every CPU (float32
GEMMs differ in their last bits by instruction set); before, the same errors were float32 expansions
(||X̂ d + (X̂ − x) w||², d = Q(w) − w) rounded as the GEMMs round.

The search starts from, and returns nothing worse than, max-scaled E2M1 (its loss is reported as
`baseline_loss`). Weight and activation formats may differ.

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
import os
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
# The activation scale's coarse pass ends after TURN_POINTS consecutive points above ACT_TURN_RATIO × the best.
TURN_POINTS = 2
ACT_TURN_RATIO = 2.0
# First weight step: formats whose coarse total is within this fraction of the best one are refined.
FORMAT_MARGIN = 0.01
# Later activation steps search around the previous step's grid index: strides 2 and 1.
LOCAL_STRIDE = 2
# Activation formats are screened on this many weight rows (`screen_format`).
SCREEN_ROWS = 96
# Activation formats whose screened error is within this fraction of the best are searched in full.
ACT_FORMAT_MARGIN = 0.05
# ... and weight formats within this fraction of the best screened weight error.
W_FORMAT_MARGIN = 0.05
# Quantized activations kept per (activation tensor, format) while a group is searched (`ActCache`).
ACT_CACHE_BYTES = 64 << 20
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


def native_rounding() -> bool:
    """Whether the search rounds its candidates in the native library (kernels/native, op `fp4_round`: one pass,
    bit for bit formats.fp4.quantize's result). LOWBIT_NATIVE_FP4=0 keeps torch's elementwise passes; without a C++
    compiler they run."""
    if os.environ.get("LOWBIT_NATIVE_FP4", "1") == "0":
        return False
    from ..kernels import native

    return native.available()


def round_fp4(x: torch.Tensor, fmt: FP4Format, scale: torch.Tensor, minus_input: bool = False) -> torch.Tensor:
    """formats.fp4.quantize(x, fmt, scale), minus x with minus_input, for float32 x and a scale with one element per
    row of a matrix x, or one in all (any shape of x then): natively when `native_rounding()`, else in torch (the
    same values)."""
    one = scale.numel() == 1
    shape_ok = x.dim() == 2 or (one and x.dim() >= 1)
    if shape_ok and x.dtype == torch.float32 and x.device.type == "cpu" and native_rounding():
        s = scale.to(torch.float32).reshape(-1)
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        out = torch.ops.lowbit_native.fp4_round(x2.contiguous(), s, fmt.m_bits, fmt.max_value(0.0), minus_input)
        return out.reshape(x.shape)
    q = f4.quantize(x, fmt, scale)
    return q.sub_(x) if minus_input else q


def int_mult(fmt: FP4Format) -> float:
    """The power of two that makes fmt's bias-0 values integers small enough for int8: E2M1 x1 (0..12), E1M2 x2
    (0..7), E3M0 x1/2 (0..64)."""
    return {0: 0.5, 1: 1.0, 2: 2.0}[fmt.m_bits]


def fp4_ints(x: torch.Tensor, fmt: FP4Format, scale: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """int8 (R, C): the signed bias-0 values of quantize(x, fmt, scale) times int_mult(fmt), for finite float32 x
    (R, C) and a scale with one element per row or one in all: natively when `native` (default `native_rounding()`),
    else in torch."""
    mult = int_mult(fmt)
    native = native_rounding() if native is None else native
    if x.dtype == torch.float32 and x.device.type == "cpu" and native:
        return torch.ops.lowbit_native.fp4_ints(x.contiguous(), scale.to(torch.float32).reshape(-1), fmt.m_bits,
                                                fmt.max_value(0.0), mult)
    s = scale.to(torch.float32)
    s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1)
    return (f4.quantize_unscaled(x, fmt, s) * mult).to(torch.int8)


def int_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · bᵀ for int8 a (R, K) and b (T, K), exactly, as int32 (R, T) (torch's int8 GEMM; float64 where that is
    missing: the sums are integers below 2**31, exact in either)."""
    if a.shape[1] * 128 * 128 >= 2**31:
        raise LowbitError(f"the FP4 search's integer products need fewer than {2**31 // 128 // 128} input features, "
                          f"got {a.shape[1]}")
    try:
        return torch._int_mm(a.contiguous(), b.contiguous().T)
    except (RuntimeError, AttributeError, NotImplementedError):
        return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def sq_err_rows(m: torch.Tensor, c: torch.Tensor, y: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """float64 (R,): Σ_t (m[r, t]·c[r] − y[r, t])² for int32 m (R, T), float32 c (R or 1 elements), float32 y (R, T):
    each difference in float32, its square summed in double (natively in a fixed order when `native`, default
    `native_rounding()`)."""
    c = c.to(torch.float32).reshape(-1)
    if native_rounding() if native is None else native:
        return torch.ops.lowbit_native.fp4_sq_err(m.contiguous(), c, y.contiguous())
    d = m.to(torch.float32) * (c.unsqueeze(1) if c.numel() > 1 else c) - y
    return d.to(torch.float64).pow_(2).sum(1)


@dataclass
class Rounded:
    """A tensor rounded to FP4, held as small integers: its values are ints · unit exactly (float32), with
    unit = scale / int_mult(fmt) (a float16 scale divided by a power of two)."""

    fmt: FP4Format
    scale: torch.Tensor  # float32 holding float16 values: (rows, 1) per row, or (1,) per tensor
    ints: torch.Tensor   # int8, the tensor's shape

    @property
    def unit(self) -> torch.Tensor:
        return self.scale.to(torch.float32) / int_mult(self.fmt)

    def values(self) -> torch.Tensor:
        """float32: formats.fp4.quantize(x, fmt, scale), with +0 for its -0."""
        return self.ints.to(torch.float32) * self.unit


def round_ints(x: torch.Tensor, fmt: FP4Format, scale: torch.Tensor) -> Rounded:
    """x rounded to fmt at scale ((rows, 1) per row or (1,) per tensor), as `Rounded`."""
    return Rounded(fmt, scale.to(torch.float32), fp4_ints(x, fmt, scale))


class _Layer:
    """Calibration data of one layer in shifted coordinates, and the exact loss."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, k: torch.Tensor | None, y64: torch.Tensor):
        self.k = k
        if k is None:
            self.x, self.w = x.to(torch.float32), w.to(torch.float32)
        else:
            self.x, self.w = apply_channel_exponents(x, w, k)
        self.y64 = y64
        self._yt = None

    @property
    def yt(self) -> torch.Tensor:
        """float32 (out, tokens): (x Wᵀ)ᵀ, what the integer products are compared with."""
        if self._yt is None:
            self._yt = self.y64.T.to(torch.float32).contiguous()
        return self._yt

    def max_scaled_weight(self, fmt: FP4Format) -> tuple[torch.Tensor, Rounded]:
        """(per-row max-scaled scales (rows, 1), the weight rounded at them) in format fmt."""
        scales = f4.max_scaled_scale(self.w.abs().amax(dim=1), fmt).unsqueeze(1)
        return scales, round_ints(self.w, fmt, scales)

    def row_errors(self, xq: Rounded, wq: Rounded) -> torch.Tensor:
        """float64 (rows,): ||X̂ q_r − y_r||² per weight row, from the exact integer products."""
        m = int_products(wq.ints, xq.ints)
        return sq_err_rows(m, wq.unit.reshape(-1) * xq.unit.reshape(-1), self.yt)

    def exact_loss(self, xq: Rounded | torch.Tensor, wq: Rounded) -> float:
        """mean (Q(x) Q(W)ᵀ − x Wᵀ)², in float64 (Q(x) = x itself in W4A16 mode)."""
        if isinstance(xq, Rounded):
            m = int_products(wq.ints, xq.ints).to(torch.float64)
            r = m.mul_(wq.unit.to(torch.float64).reshape(-1, 1) * xq.unit.to(torch.float64)).sub_(self.y64.T)
        else:
            r = xq.to(torch.float64) @ wq.values().to(torch.float64).T - self.y64
        return float(r.pow(2).mean())


def _coarse_to_fine(n: int):
    """Indices of the coarse pass over a sorted grid of n points, and its step.

    With more than COARSE_POINTS points the coarse pass takes every step-th point (and the last); a weight row then
    tries every point within step - 1 of its best (`_RowSearch.scan`: 28 candidates on the 101-point grid), the
    activation scale a halving stride around its best (`_RowSearch.refine`).
    """
    step = max(1, -(-n // COARSE_POINTS))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx, step


class _RowSearch:
    """Per-row minimum of an error over grid indices 0..n-1, the rows searched independently but evaluated together.

    `evaluate(idx)` returns the errors (rows,) of candidate idx[r] for every row r. Each row keeps its best error
    and index; a candidate replaces them only when strictly better, except in the descending coarse pass, where an
    equal error moves the best to the lower index (ties resolve to the lowest index, as an ascending scan would).
    """

    def __init__(self, evaluate, rows: int, n: int):
        self.evaluate, self.rows, self.n = evaluate, rows, n
        self.err = torch.full((rows,), math.inf, dtype=torch.float64)
        self.idx = torch.zeros(rows, dtype=torch.long)

    def _take(self, idx, or_equal=False):
        err = self.evaluate(idx).to(torch.float64)
        better = (err <= self.err) if or_equal else (err < self.err)
        self.err = torch.where(better, err, self.err)
        self.idx = torch.where(better, idx, self.idx)
        return err

    def descend(self, coarse, turn_ratio: float | None = None):
        """The coarse pass, from the top of the grid down. With turn_ratio, the pass ends once every row has seen
        TURN_POINTS consecutive points above turn_ratio × its best (the error curve has turned and climbs: below
        the optimum, clipping error only grows); without, every coarse point is evaluated."""
        rises = torch.zeros(self.rows, dtype=torch.long)
        for i in sorted(coarse, reverse=True):
            err = self._take(torch.full((self.rows,), i, dtype=torch.long), or_equal=True)
            if turn_ratio is not None:
                rises = torch.where(err > turn_ratio * self.err, rises + 1, 0)
                if bool((rises >= TURN_POINTS).all()):
                    break

    def refine(self, stride: int):
        """Halve a stride around each row's best: best ± h for h = stride, stride/2, ..., 1 (clamped to the grid)."""
        h = 1 << (stride.bit_length() - 1) if stride >= 1 else 0
        while h >= 1:
            for sign in (-1, 1):
                self._take((self.idx + sign * h).clamp(0, self.n - 1))
            h //= 2

    def scan(self, width: int):
        """Every point within width of each row's best (as it stood before the scan), clamped to the grid."""
        centre = self.idx.clone()
        for j in range(-width, width + 1):
            if j:
                self._take((centre + j).clamp(0, self.n - 1))

    def restart(self, idx: torch.Tensor):
        """Start from given indices (a previous round's), their errors evaluated anew."""
        self.err = torch.full((self.rows,), math.inf, dtype=torch.float64)
        self._take(idx.clone())


def _weight_step(layer: _Layer, xq: Rounded | torch.Tensor, w_formats, clip_grid, refine: bool = True,
                 row_weight: torch.Tensor | None = None, totals: dict | None = None):
    """Best weight format and per-row scales given the (fixed) activations: xq `Rounded` (quantized), or the float
    activations themselves (W4A16).

    Row r's error for a candidate q_r is ||X̂ q_r − x w_r||². With quantized activations both factors are small
    integers times scales, so X̂ q_r is computed exactly from the int8 products (`int_products`) and compared with
    y_r = x w_r (`sq_err_rows`). With float activations (W4A16: X̂ = x) it is ||x d_r||², d_r = q_r − w_r, from the
    tokens when there are fewer tokens than input features, else as d_rᵀ H d_r with H = xᵀx.

    For every format the coarse pass over the clip grid; with refine, the formats whose coarse total is within
    FORMAT_MARGIN of the best are refined (every point within step - 1 of each row's best), and the smallest total
    wins. A format's total is the sum of its rows' errors, each times row_weight (a screen's rows standing for
    others); `totals`, if given, receives every format's. Returns (format, scales (rows, 1), `Rounded` weight).
    """
    x, w = layer.x, layer.w
    grid = torch.tensor(clip_grid, dtype=torch.float32)
    coarse, step = _coarse_to_fine(len(clip_grid))
    quantized_act = isinstance(xq, Rounded)
    native = native_rounding()
    if quantized_act:
        x_ints, x_unit, yt = xq.ints, xq.unit.reshape(-1), layer.yt
    else:
        by_tokens = x.shape[0] < x.shape[1]
        hess = None if by_tokens else x.T @ x
    amax = w.abs().amax(dim=1)
    rows, n = w.shape[0], len(clip_grid)

    def search(fmt):
        # every row's scale for every clip value at once: the same elementwise float32 operations as one
        # max_scaled_scale(amax, fmt, γ) call per candidate, so the same float16 scales
        scales = f4.max_scaled_scale(amax.unsqueeze(1), fmt, grid)  # (rows, n)
        mult = int_mult(fmt)

        def evaluate(idx):
            s = scales.gather(1, idx.unsqueeze(1))
            if quantized_act:
                m = int_products(fp4_ints(w, fmt, s, native), x_ints)
                return sq_err_rows(m, s.to(torch.float32).reshape(-1) / mult * x_unit, yt, native)
            d = round_fp4(w, fmt, s, minus_input=True)
            if by_tokens:
                return (x @ d.T).pow_(2).sum(0)
            return (d @ hess).mul_(d).sum(1)

        return _RowSearch(evaluate, rows, n), scales

    def total(rs):
        return float(rs.err.sum() if row_weight is None else (rs.err * row_weight).sum())

    found = {}
    for fmt in w_formats:
        rs, scales = search(fmt)
        rs.descend(coarse)
        found[fmt] = (total(rs), rs, scales)
    top = min(t for t, _, _ in found.values())
    for fmt, (t, rs, scales) in found.items():
        if refine and t <= top * (1 + FORMAT_MARGIN):
            rs.scan(step - 1)
            found[fmt] = (total(rs), rs, scales)
    if totals is not None:
        totals.update({f: t for f, (t, _, _) in found.items()})
    fmt = min(found, key=lambda f: found[f][0])  # the first of equal totals, in w_formats order
    _, rs, scales = found[fmt]
    row_scale = scales.gather(1, rs.idx.unsqueeze(1))
    return fmt, row_scale, round_ints(w, fmt, row_scale)


class ActCache:
    """Quantized activations (int8, `fp4_ints`) by scale, for ONE shifted activation tensor x' and one activation
    format.

    The layers of a group read the same x' and try the same candidate scales, and so do a screen and the search
    after it: the quantized tensors are made once. The caller keeps one cache per (x', format); at most
    ACT_CACHE_BYTES are kept (later scales are quantized again when asked)."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit = ACT_CACHE_BYTES if limit_bytes is None else limit_bytes
        self.tensors: dict[float, torch.Tensor] = {}
        self.bytes = 0

    def ints(self, x: torch.Tensor, fmt: FP4Format, s: torch.Tensor) -> torch.Tensor:
        key = float(s)
        xq = self.tensors.get(key)
        if xq is None:
            xq = fp4_ints(x, fmt, s)
            size = xq.numel() * xq.element_size()
            if self.bytes + size <= self.limit:
                self.tensors[key] = xq
                self.bytes += size
        return xq


def _act_step(layer: _Layer, wq: Rounded, a_fmt: FP4Format, clip_grid, prev: int | None = None,
              cache: ActCache | None = None):
    """Best per-tensor activation scale for a_fmt given the (fixed) quantized weight wq.

    The error ||X̂ Ŵᵀ − x Wᵀ||² of a candidate is computed exactly from the int8 products of the two (`int_products`,
    `sq_err_rows`). First step (prev None): the coarse pass from the top of the clip grid down, ending once the error
    has stayed above ACT_TURN_RATIO × the best for TURN_POINTS points, then a halving refinement around the best;
    a later step (prev: the previous step's grid index) starts there with stride LOCAL_STRIDE. Several clip values
    can give the same float16 scale: each scale is evaluated once. `cache` holds quantized activations of this
    layer's x' and a_fmt (shared with other layers of a group). Returns (scale (1,), `Rounded` x, grid index);
    the integers may be the cache's tensor: not to be modified.
    """
    x, yt = layer.x, layer.yt
    amax = x.abs().max()
    w_unit = wq.unit.reshape(-1)
    mult = int_mult(a_fmt)
    native = native_rounding()
    tried: dict[float, tuple] = {}
    cache = ActCache(0) if cache is None else cache

    def scale_of(i):
        return f4.max_scaled_scale(amax, a_fmt, clip_grid[i]).reshape(1)

    def evaluate(idx):
        s = scale_of(int(idx[0]))
        if float(s) not in tried:
            x_ints = cache.ints(x, a_fmt, s)
            m = int_products(wq.ints, x_ints)
            err = float(sq_err_rows(m, w_unit * (s.to(torch.float32) / mult), yt, native).sum())
            tried[float(s)] = (err, x_ints)
        return torch.tensor([tried[float(s)][0]], dtype=torch.float64)

    coarse, step = _coarse_to_fine(len(clip_grid))
    rs = _RowSearch(evaluate, 1, len(clip_grid))
    if prev is None:
        rs.descend(coarse, ACT_TURN_RATIO)
        rs.refine(step - 1)
    else:
        rs.restart(torch.tensor([prev]))
        rs.refine(LOCAL_STRIDE)
    i = int(rs.idx[0])
    s = scale_of(i)
    return s, Rounded(a_fmt, s.to(torch.float32), tried[float(s)][1]), i


def _start_format(formats):
    """Where a search starts: E2M1 when allowed, else the first allowed format."""
    base = f4.fp4_format(BASELINE_FORMAT)
    return base if base in formats else formats[0]


def kept_formats(scores: dict, margin: float | None = None) -> list:
    """The keys of `scores` (screened relative errors, `screen_format`) within margin (ACT_FORMAT_MARGIN) of the
    smallest, in their order."""
    margin = ACT_FORMAT_MARGIN if margin is None else margin
    top = min(scores.values())
    return [f for f, s in scores.items() if s <= top * (1 + margin)]


@dataclass
class Screened:
    """What screening one activation format on one layer found (`screen_format`)."""

    score: float     # estimated relative output error, loss / mean y²
    w_formats: list  # the weight formats within W_FORMAT_MARGIN of the best on the screened rows, in order


def screen_format(x: torch.Tensor, w: torch.Tensor, a_fmt: FP4Format, k: torch.Tensor | None, w_formats, clip_grid,
                  rows: int | None = None, y64: torch.Tensor | None = None,
                  cache: ActCache | None = None) -> Screened:
    """One activation step and one coarse weight step for a_fmt on at most `rows` (SCREEN_ROWS) weight rows: the
    estimated relative output error (loss / mean y²), by which the search drops activation formats before
    searching them on all rows, and the weight formats worth a full search (the others are not searched).

    Given the activation scale the rows' errors are independent, so a subset estimates the whole: the rows with
    the largest outputs (a quarter of the subset; a few output channels can carry most of a layer's output, as
    MiniLM's FFN outputs do) count once, evenly spaced rows of the others stand for all the others. y64: x Wᵀ in
    float64 when the caller has it; cache: quantized activations of x·2**k in a_fmt (`ActCache`)."""
    rows = SCREEN_ROWS if rows is None else rows
    out = w.shape[0]
    w = w.detach().to(torch.float32)
    if y64 is None:
        y64 = x.to(torch.float64) @ w.to(torch.float64).T
    energy = y64.pow(2).sum(0)  # per row
    if out <= rows:
        sel, weight = torch.arange(out), torch.ones(out, dtype=torch.float64)
    else:
        top = energy.topk(rows // 4).indices.sort().values
        rest = torch.ones(out, dtype=torch.bool)
        rest[top] = False
        others = rest.nonzero().flatten()
        picked = others[torch.arange(0, others.numel(), -(-others.numel() // (rows - top.numel())))]
        sel = torch.cat([top, picked])
        weight = torch.cat([torch.ones(top.numel(), dtype=torch.float64),
                            torch.full((picked.numel(),), others.numel() / picked.numel(), dtype=torch.float64)])
    layer = _Layer(x, w[sel], k, y64[:, sel])
    _, wq = layer.max_scaled_weight(_start_format(w_formats))
    _, xq, _ = _act_step(layer, wq, a_fmt, clip_grid, cache=cache)
    totals: dict = {}
    _, _, wq = _weight_step(layer, xq, w_formats, clip_grid, refine=False, row_weight=weight, totals=totals)
    err = layer.row_errors(xq, wq)
    total = float(energy.sum())
    score = float((err * weight).sum()) / total if total > 0 else float((err * weight).sum())
    return Screened(score, kept_formats(totals, W_FORMAT_MARGIN))


def _result(fqn, layer: _Layer, w_fmt, w_scales, a_fmt, a_scale, in_f, loss) -> FP4LinearQuant:
    codes = f4.encode(layer.w, w_fmt, w_scales)
    k = layer.k if layer.k is not None and bool(layer.k.any()) else None
    return FP4LinearQuant(fqn=fqn, w_format=w_fmt, a_format=a_fmt, qweight=f4.pack_codes(codes),
                          w_scales=w_scales.clone(), act_scale=None if a_scale is None else a_scale.clone(),
                          act_exponents=k, in_features=in_f, loss=loss)


def _max_scaled(fqn, layer: _Layer, w_fmt: FP4Format, a_fmt: FP4Format | None) -> FP4LinearQuant:
    """Max-scaled biases (per row for W, per tensor for x) on the layer's (possibly shifted) coordinates."""
    w_scales, wq = layer.max_scaled_weight(w_fmt)
    a_scale, xq = None, layer.x
    if a_fmt is not None:
        a_scale = f4.max_scaled_scale(layer.x.abs().max(), a_fmt).reshape(1)
        xq = round_ints(layer.x, a_fmt, a_scale)
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
    screen: bool = True,
    act_caches: dict | None = None,
    y64: torch.Tensor | None = None,
    screened: dict | None = None,
) -> FP4LinearQuant:
    """LLM-FP4's per-layer search on calibration inputs x (..., in_features) for weight w (out, in).

    act_quant False is W4A16 (one weight step; activations stay float). channel_shift computes per-channel
    exponents from x for each activation format (`channel_exponents`); `act_exponents` fixes them instead,
    for every format (e.g. one k for all consumers of one norm: `channel_exponents(amax, fmt)` of the
    shared input), and the result then always uses them. The result is the best configuration evaluated,
    within the allowed formats: never worse than `max_scaled_fp4` on this data (reported as
    `baseline_loss`) when E2M1 is allowed and act_exponents are not fixed (else never worse than the
    max-scaled quantizer in the allowed formats on the shifted tensors).

    screen: with several formats, screen them first (`screen_format`) and search the kept ones only (False:
    search every format). act_caches: {format name: ActCache} of quantized activations, to share between
    calls on the same x with the same shifts (the layers of a group); y64: x Wᵀ in float64, if at hand;
    screened: {format: Screened} when the caller screened already (each format's search then takes the weight
    formats its screen kept; a_formats still says which activation formats to search).
    The cost is about 28 weight candidates per kept weight format plus ~20 activation candidates per kept activation
    format and weight step (usually one), each an int8 product of out·in·tokens multiply-adds (W4A16's weight
    candidates: float32, out·min(in, tokens)·in): pass a token sample, not a whole calibration set.
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
    if y64 is None:
        y64 = x.to(torch.float64) @ w.to(torch.float64).T
    base_fmt = f4.fp4_format(BASELINE_FORMAT)
    baseline = _max_scaled(fqn, _Layer(x, w, None, y64), base_fmt, base_fmt if act_quant else None)
    start_w = _start_format(w_formats)
    start_a = _start_format(a_formats) if act_quant else None
    if act_exponents is None and start_w == base_fmt and start_a == (base_fmt if act_quant else None):
        best = baseline  # the same quantizer on the same tensors
    else:
        best = _max_scaled(fqn, _Layer(x, w, act_exponents, y64), start_w, start_a)
    baseline_loss = baseline.loss
    channel_amax = x.abs().amax(dim=0)

    def shifts(a_fmt):
        if act_exponents is not None:
            return act_exponents
        return channel_exponents(channel_amax, a_fmt) if a_fmt is not None and channel_shift else None

    act_caches = {} if act_caches is None else act_caches
    caches = {f: act_caches.setdefault(f.name, ActCache()) for f in a_formats if f is not None}
    screened = dict(screened or {})
    if screen and act_quant and not screened and (len(a_formats) > 1 or len(w_formats) > 1):
        screened = {f: screen_format(x, w, f, shifts(f), w_formats, clip_grid, y64=y64, cache=caches[f])
                    for f in a_formats}
        a_formats = kept_formats({f: s.score for f, s in screened.items()})
    for a_fmt in a_formats:
        k = shifts(a_fmt)
        layer = _Layer(x, w, k, y64)
        step_formats = screened[a_fmt].w_formats if a_fmt in screened else w_formats
        if a_fmt is None:
            xq, a_scale = layer.x, None
            w_fmt, w_scales, wq = _weight_step(layer, xq, step_formats, clip_grid)
        else:
            # Activation step first, against the max-scaled start weights; then weight and activation steps in
            # turn. A weight step depends only on the activation scale, an activation step only on the quantized
            # weight (format and row scales): a step whose input was seen before is taken from there (once the
            # scales stop changing, the remaining rounds cost nothing).
            w_fmt = start_w
            w_scales, wq = layer.max_scaled_weight(w_fmt)
            weight_steps: dict = {}
            act_steps: dict = {}
            a_prev = None
            for _ in range(rounds):
                key = (w_fmt.name, w_scales.numpy().tobytes())
                if key not in act_steps:
                    act_steps[key] = _act_step(layer, wq, a_fmt, clip_grid, a_prev, caches[a_fmt])
                a_scale, xq, a_prev = act_steps[key]
                key = float(a_scale)
                if key not in weight_steps:
                    weight_steps[key] = _weight_step(layer, xq, step_formats, clip_grid)
                w_fmt, w_scales, wq = weight_steps[key]
        loss = layer.exact_loss(xq, wq)
        if loss < best.loss:
            best = _result(fqn, layer, w_fmt, w_scales, a_fmt, a_scale, in_f, loss)
    best.baseline_loss = baseline_loss
    best.notes = notes
    return best
