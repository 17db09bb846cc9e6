"""E8P, QuIP#'s 2-bit E8 lattice codebook (Tseng et al. 2024, sec. 4), and residual E8 codebooks for 3 and 4 bits.

Construction. D̂8 = D8 + ½·1 = {x ∈ (Z + ½)^8 : Σx even} is the half of E8 = D8 ∪ D̂8 without zero. The absolute
values |x| of its points of squared norm ≤ 10 are the 227 vectors with entries in {½, 3/2, 5/2} and
#(3/2) + 3·#(5/2) ≤ 4; QuIP# adds 29 of the 56 vectors with five entries 3/2 and three ½ (norm² 12) to reach
256 (`abs_grid`). A codeword is σ ⊙ a ± ¼·1: a one of the 256 absolute vectors, σ ∈ {±1}^8 with the parity that
keeps σ ⊙ a in D̂8 (the number of minus signs ≡ the number of 3/2 entries of a, mod 2), and a shift of ±¼ on every
coordinate. The 2^16 codewords are distinct (no duplicates), lie in E8 + ¼·1, and 4·value is an odd integer in
[-11, 11]: every decoded entry is (c − 7.5)/2 for an integer c in [2, 13], a 4-bit midrise digit.

Code layout, 16 bits per 8 weights: bit 0 the shift (1: +¼, 0: −¼); bit k (k = 1..7) set when coordinate k is
negative; bits 8..15 the index into `abs_grid()`. The sign of coordinate 0 follows from the parity:

    a = abs_grid[code >> 8];  neg_k = (code >> k) & 1  (k = 1..7);
    neg_0 = (popcount(code & 0xFE) + abs_parity[code >> 8]) & 1;
    value = (1 − 2·neg) ⊙ a + ((code & 1) ? +¼ : −¼)

Codes are held as int32 in [0, 65535] (torch's uint16 has no shifts or reductions on CPU); `pack_codes` stores a
group's codes as one little-endian integer, as `packing.pack` does: 2 bytes per 8 weights at 2 bits.

`encode` returns the exact nearest codeword (see its docstring for the tie rule) without searching all 65536:
the 227 absolute vectors are closed under permutation, so for each of their 7 types (counts of 3/2 and 5/2) the
best arrangement follows from sorting |x|, and only the 29 norm-12 vectors are tried one by one.

Residual formats (`E8Format`): 3 bits = E8P + a 1-bit E8 codebook (the 241 points of E8 with norm² ≤ 2 and 15
of the 16 points ±2e_i) on the residual; 4 bits = E8P + E8P on the residual. The residual codebook is scaled by
1/ratio, a constant of the format: ŵ = s·(C₁[c₁] + C₂[c₂]/ratio) with one scale s per row. Measured MSE on
Gaussian rows of 512 with per-row scales (scalar grids: round to nearest with the clipping search of rtn.py):
2 bits E8P 0.0918 vs int2 0.1192; 3 bits E8P + E8 ball 0.0297, E8P + a sign bit per weight (ŵ = s·(C₁ ± 1/4))
0.0325, int3 0.0373; 4 bits E8P + E8P 0.0085 vs int4 0.0116. The ball beats the sign residual, so it is the
3-bit design.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import torch

from ..errors import LowbitError

DIM = 8  # weights per code
N_CODES = 1 << 16
_CHUNK = 4096  # rows of x per encode step: the cost per vector is least at a few thousand (temporaries stay in cache)

# QuIP#'s 29 norm-12 absolute vectors (five 3/2, three ½), given by the positions of their ½ entries, in the
# order of quip-sharp's lib/codebook/latticee8_padded12_rvq4bit.py (that list, unlike the first E8P release,
# has no duplicate row).
_NORM12_HALVES = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2), (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5), (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6),
    (1, 4, 6), (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6), (0, 1, 4), (2, 3, 7),
)
N_SHELL = 227  # absolute vectors of norm² ≤ 10: indices [0, 227), ascending lexicographic order

# The 7 types of the 227: (#5/2, #3/2) with #3/2 + 3·#5/2 ≤ 4. Levels 0, 1, 2 stand for ½, 3/2, 5/2.
_TYPES = ((0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1))


# ----------------------------------------------------------------------------- tables


@cache
def abs_grid() -> torch.Tensor:
    """The 256 absolute vectors (256, 8) float32: the 227 of norm² ≤ 10 sorted lexicographically, then the 29 of
    norm² 12. Cached: do not modify."""
    shell = [v for v in itertools.product((0, 1, 2), repeat=DIM) if v.count(1) + 3 * v.count(2) <= 4]
    assert len(shell) == N_SHELL
    norm12 = [tuple(0 if i in halves else 1 for i in range(DIM)) for halves in _NORM12_HALVES]
    levels = torch.tensor(sorted(shell) + norm12, dtype=torch.float32)  # sorted: lexicographic in the values too
    return levels + 0.5


@cache
def abs_parity() -> torch.Tensor:
    """(256,) int64: the number of 3/2 entries of each absolute vector mod 2 = the parity its minus signs need."""
    return ((abs_grid() == 1.5).sum(dim=-1) % 2).to(torch.int64)


def _decode_formula(codes: torch.Tensor) -> torch.Tensor:
    """The decode formula of the module docstring, on int64 codes (..., ) -> (..., 8) float32."""
    k = torch.arange(DIM)
    a = abs_grid()[codes >> 8]
    neg = (codes[..., None] >> k) & 1
    neg[..., 0] = (neg[..., 1:].sum(dim=-1) + abs_parity()[codes >> 8]) & 1
    shift = torch.where(codes & 1 == 1, 0.25, -0.25).to(torch.float32)
    return (1 - 2 * neg).to(torch.float32) * a + shift[..., None]


@cache
def codebook() -> torch.Tensor:
    """All 65536 codewords (65536, 8) float32, row i = decode(i). Cached: do not modify."""
    return _decode_formula(torch.arange(N_CODES, dtype=torch.int64))


@dataclass(frozen=True)
class _EncodeTables:
    levels: torch.Tensor  # (8, 8) float64: rows 0-6 each type's values in descending order, row 7 the norm-12 ones
    type_digits: torch.Tensor  # (7, 8) float64: the types as level digits 0/1/2, descending
    type_norm2: torch.Tensor  # (7,) float64
    type_parity: torch.Tensor  # (7,) int32
    key_to_abs: torch.Tensor  # (3^8,) float64: level key Σ digit_i·3^(7−i) -> abs index (-1: not in the grid)
    norm12: torch.Tensor  # (29, 8) float64
    norm12_halves: torch.Tensor  # (87,) int64: positions of the ½ entries, 3 per vector
    twelve: torch.Tensor  # (29,) float64: their squared norms
    abs64: torch.Tensor  # (256, 8) float64
    parity: torch.Tensor  # (256,) int32
    pow3: torch.Tensor  # (8,) float64: 3^(7−i)
    bit: torch.Tensor  # (8,) int32: the code bit of coordinate i (0 for coordinate 0, which has none)
    prio_pos: torch.Tensor  # (8,) int32: preference for flipping a positive coordinate, see _encode_rows
    prio_step: torch.Tensor  # (8,) int32: added for a negative one


@cache
def _encode_tables() -> _EncodeTables:
    digits = torch.tensor([[2] * c + [1] * b + [0] * (DIM - b - c) for c, b in _TYPES], dtype=torch.float64)
    n12 = torch.tensor([[1.5] * 5 + [0.5] * 3], dtype=torch.float64)
    grid = abs_grid().to(torch.float64)
    pow3 = 3.0 ** torch.arange(DIM - 1, -1, -1, dtype=torch.float64)  # the sort runs on the flipped |y|
    key_to_abs = torch.full((3**DIM,), -1, dtype=torch.float64)
    key_to_abs[((grid[:N_SHELL] - 0.5) @ pow3.flip(0)).to(torch.int64)] = torch.arange(N_SHELL, dtype=torch.float64)
    k = torch.arange(DIM, dtype=torch.int32)
    # Flipping coordinate k ≥ 1 toggles code bit k; coordinate 0 has no bit. Lowest code first: clear the
    # highest set bit (a negative coordinate), else flip coordinate 0, else set the lowest clear bit.
    return _EncodeTables(
        levels=torch.cat([digits + 0.5, n12]), type_digits=digits, type_norm2=(digits + 0.5).square().sum(dim=-1),
        type_parity=torch.tensor([b % 2 for _, b in _TYPES], dtype=torch.int32), key_to_abs=key_to_abs,
        norm12=grid[N_SHELL:].contiguous(), norm12_halves=torch.tensor(_NORM12_HALVES).flatten(),
        twelve=torch.full((len(_NORM12_HALVES),), 12.0, dtype=torch.float64), abs64=grid,
        parity=abs_parity().to(torch.int32), pow3=pow3, bit=torch.where(k == 0, 0, 1 << k).to(torch.int32),
        prio_pos=torch.where(k == 0, 8, 8 - k).to(torch.int32),
        prio_step=torch.where(k == 0, 0, 8 + 2 * k).to(torch.int32),
    )


# ----------------------------------------------------------------------------- encode / decode


def _check_vectors(x: torch.Tensor, what: str) -> None:
    if x.dim() < 1 or x.shape[-1] != DIM:
        raise LowbitError(f"{what}: expected vectors of {DIM} values in the last dimension, got shape "
                          f"{tuple(x.shape)}; reshape the weight to (..., {DIM}) groups first")
    if not x.is_floating_point():
        raise LowbitError(f"{what}: expected a floating point tensor, got {x.dtype}")
    if x.numel() and not math.isfinite(float(x.sum(dtype=torch.float64))) and not bool(torch.isfinite(x).all()):
        raise LowbitError(f"{what}: input has NaN or Inf values")


def _encode_rows(x: torch.Tensor) -> torch.Tensor:
    """Codes int32 (N,) of x (N, 8) float64. Written for speed on CPU: reductions over the small last dimension
    run on float64 or int32 (int64 ones are 10x slower) and masks multiply instead of torch.where."""
    t = _encode_tables()
    n = x.shape[0]
    # Rows [0, n) look for σ⊙a near y = x + ¼ (codewords with shift −¼, bit 0), rows [n, 2n) near x − ¼ (bit 1).
    y = torch.cat([x + 0.25, x - 0.25])
    u = y.abs()
    neg = y < 0  # zeros count as positive: their sign is free, and + keeps the code lower
    q = neg.sum(dim=-1, dtype=torch.int32) & 1  # parity of the sign pattern of y
    # Permutation-closed shell: for each type the best arrangement puts the largest levels on the largest |y|.
    # A parity mismatch costs 4·min_i a_i·|y_i| = 2·min|y| (the smallest |y| carries a ½). Ties between equal
    # |y| go to the lexicographically smallest arrangement (= lowest index): larger levels on later coordinates,
    # which the stable sort of the flipped |y| gives.
    v, order = u.flip(-1).sort(dim=-1, descending=True, stable=True)
    vmin = v[:, -1]
    dots = v @ t.levels.t()
    best = t.type_norm2 - 2 * dots[:, :7] + 2 * vmin.unsqueeze(-1) * (q.unsqueeze(-1) != t.type_parity)
    idx = torch.take(t.key_to_abs, (torch.take(t.pow3, order) @ t.type_digits.t()).to(torch.int64))
    low = best.amin(dim=-1)
    abs_idx = (idx + (best != low.unsqueeze(-1)) * 256.0).amin(dim=-1).to(torch.int32)  # ties: lowest index
    # The 29 norm-12 vectors (odd parity) lose ties (their indices are higher) and score no better than the best
    # arrangement of (3/2)⁵(½)³ among all 56, sorted like a shell type: only rows where that bound beats the
    # shell try them one by one.
    even = q == 0
    rows = torch.nonzero(12 - 2 * dots[:, 7] + 2 * vmin * even < low).squeeze(-1)
    if rows.numel():
        ur = u.index_select(0, rows)
        s12 = torch.addmm(t.twelve, ur, t.norm12.t(), alpha=-2)
        # min_i a_i·|y_i| = min(½·least |y| over the ½ entries, 3/2·min|y|): the smallest |y| either sits on a
        # ½ entry or carries 3/2 and is then the least of the 3/2 terms.
        halves = ur.index_select(1, t.norm12_halves).view(-1, len(_NORM12_HALVES), 3).amin(dim=-1)
        pen = torch.minimum(0.5 * halves, 1.5 * vmin.index_select(0, rows).unsqueeze(-1))
        s12 += 4 * pen * even.index_select(0, rows).unsqueeze(-1)
        low12, arg12 = s12.min(dim=-1)  # ties: the first, the lowest index
        win = low12 < low.index_select(0, rows)
        abs_idx[rows[win]] = (N_SHELL + arg12[win]).to(torch.int32)
        low[rows[win]] = low12[win]
    # Signs: those of y, and on a parity mismatch one flip where a_i·|y_i| is least (ties: lowest code).
    c = t.abs64.index_select(0, abs_idx) * u
    prio = (c == c.amin(dim=-1, keepdim=True)) * (t.prio_pos + neg * t.prio_step)
    toggle = (q != t.parity.index_select(0, abs_idx)) * t.bit.index_select(0, prio.argmax(dim=-1))
    codes = (abs_idx << 8) | ((neg.to(torch.int32) * t.bit).sum(dim=-1, dtype=torch.int32) ^ toggle)
    dist = y.square().sum(dim=-1) + low  # ‖y − σ⊙a‖²
    c0, c1 = codes[:n], codes[n:] | 1
    take = (dist[n:] < dist[:n]) | ((dist[n:] == dist[:n]) & (c1 < c0))
    return torch.where(take, c1, c0)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E8P codeword of each 8-vector of x (..., 8): codes (...) int32 in [0, 65535].

    Exact: the result minimizes ‖x − codebook()[code]‖² over all 65536 codewords; among codewords at exactly
    equal distance it is the lowest code. The search runs in float64 (x is converted), so "exactly" means in
    float64 arithmetic, which is exact for inputs with short binary expansions (every codeword, midpoints
    between codewords, multiples of 2⁻¹⁰ of moderate size); for other inputs only distances equal to within a
    float64 rounding can be ordered differently from exact arithmetic.
    """
    _check_vectors(x, "e8p.encode")
    flat = x.detach().reshape(-1, DIM).to(torch.float64, memory_format=torch.contiguous_format)  # strided: 2x slower
    out = torch.empty(flat.shape[0], dtype=torch.int32)
    for i in range(0, flat.shape[0], _CHUNK):
        out[i:i + _CHUNK] = _encode_rows(flat[i:i + _CHUNK]).to(torch.int32)
    return out.reshape(x.shape[:-1])


def _check_codes(codes: torch.Tensor, limit: int, what: str) -> torch.Tensor:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise LowbitError(f"{what}: expected integer codes, got {codes.dtype}")
    if codes.dtype == torch.int16:  # a little-endian uint16 code read as int16
        return codes.to(torch.int64) & 0xFFFF
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= limit):
        raise LowbitError(f"{what}: codes must lie in [0, {limit}), got [{int(c.min())}, {int(c.max())}]")
    return c


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Codewords (..., 8) float32 of integer codes (...): int32/int64 in [0, 65535], or int16 holding the 16 bits."""
    return codebook()[_check_codes(codes, N_CODES, "e8p.decode")]


# ----------------------------------------------------------------------------- the 1-bit E8 codebook (3-bit residual)


@cache
def e8_ball() -> torch.Tensor:
    """(256, 8) float32: the 241 points of E8 with norm² ≤ 2 (0, the 112 roots (±1, ±1, 0⁶), the 128 roots
    (±½)⁸ with an even number of minus signs) in ascending lexicographic order, then +2e_0..+2e_7 and
    −2e_0..−2e_6 (−2e_7 left out, as in QuIP#'s 3-bit codebook). Entries are multiples of ½ in [-2, 2].
    Cached: do not modify."""
    pts = [(0.0,) * DIM]
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((-1.0, 1.0), repeat=2):
            p = [0.0] * DIM
            p[i], p[j] = si, sj
            pts.append(tuple(p))
    pts += [s for s in itertools.product((-0.5, 0.5), repeat=DIM) if sum(v < 0 for v in s) % 2 == 0]
    far = [tuple(2.0 * s if k == i else 0.0 for k in range(DIM)) for s in (1, -1) for i in range(DIM)][:15]
    return torch.tensor(sorted(pts) + far, dtype=torch.float32)


@dataclass(frozen=True)
class _BallTables:
    pair: torch.Tensor  # (8, 8, 2, 2) int32: (i, j, neg_i, neg_j) -> index of ±e_i ± e_j
    half: torch.Tensor  # (256,) int32: minus-sign mask -> index of the (±½)⁸ point (-1: odd)
    far: torch.Tensor  # (15,) int32: +2e_0..+2e_7, −2e_0..−2e_6
    zero: int


@cache
def _ball_tables() -> _BallTables:
    grid = e8_ball()
    where = {tuple(p): i for i, p in enumerate(grid.tolist())}
    pair = torch.full((DIM, DIM, 2, 2), -1, dtype=torch.int32)
    for i, j in itertools.permutations(range(DIM), 2):
        for ni, nj in itertools.product((0, 1), repeat=2):
            p = [0.0] * DIM
            p[i], p[j] = 1.0 - 2 * ni, 1.0 - 2 * nj
            pair[i, j, ni, nj] = where[tuple(p)]
    half = torch.full((256,), -1, dtype=torch.int32)
    for mask in range(256):
        p = tuple(-0.5 if mask >> k & 1 else 0.5 for k in range(DIM))
        half[mask] = where.get(p, -1)
    return _BallTables(pair, half, torch.arange(256 - 15, 256, dtype=torch.int32), where[(0.0,) * DIM])


def _encode_ball_search(x: torch.Tensor) -> torch.Tensor:
    """Codes int32 of x (N, 8) float64 by search over all 256 points (ties: the lowest code)."""
    grid = e8_ball().to(torch.float64)
    norm2, minus2 = grid.square().sum(dim=-1, keepdim=True), -2 * grid
    d = torch.addmm(norm2, minus2, x.t())  # (256, N): ‖c‖² − 2c·x, reduced over dim 0, which vectorizes
    return (torch.arange(256, dtype=torch.float64).unsqueeze(-1) + (d != d.amin(dim=0)) * 256.0).amin(dim=0).to(
        torch.int32)


def _encode_ball_rows(x: torch.Tensor) -> torch.Tensor:
    """Codes int32 of x (N, 8) float64. The best point of each class of the ball follows from sorting |x|:
    0; ±e_i ± e_j on the two largest |x|; (±½)⁸ with the signs of x, the least |x| flipped on odd parity;
    ±2e_i on the largest allowed ±x_i. Rows where any of these choices, or the classes, tie are searched."""
    t = _ball_tables()
    ax, neg = x.abs(), x < 0
    v, order = ax.sort(dim=-1, descending=True)
    odd = neg.sum(dim=-1, dtype=torch.int32) & 1
    signed = torch.cat([x, -x[:, :DIM - 1]], dim=-1)  # the 15 far points' ±x_i / 2
    top, far = signed.max(dim=-1)
    scores = torch.stack([torch.zeros_like(top), 2 - 2 * (v[:, 0] + v[:, 1]),
                          2 - ax.sum(dim=-1) + 2 * odd * v[:, -1], 4 - 4 * top], dim=-1)
    best, cls = scores.min(dim=-1)
    i, j = order[:, 0], order[:, 1]
    k = order[:, -1:]
    mask = neg.scatter(-1, k, neg.gather(-1, k) ^ odd.unsqueeze(-1).bool())
    bits = (mask.to(torch.int32) << torch.arange(DIM, dtype=torch.int32)).sum(dim=-1, dtype=torch.int32)
    choice = torch.stack([torch.full_like(bits, t.zero), t.pair[i, j, neg.gather(-1, i[:, None]).squeeze(-1).long(),
                          neg.gather(-1, j[:, None]).squeeze(-1).long()], t.half[bits], t.far[far]], dim=-1)
    codes = choice.gather(-1, cls[:, None]).squeeze(-1)
    tied = ((scores == best[:, None]).sum(dim=-1) > 1) | ((cls == 1) & (v[:, 1] == v[:, 2])) \
        | ((cls == 2) & (v[:, -2] == v[:, -1])) | ((cls == 3) & ((signed == top[:, None]).sum(dim=-1) > 1))
    rows = torch.nonzero(tied).squeeze(-1)
    if rows.numel():
        codes[rows] = _encode_ball_search(x[rows])
    return codes


def encode_ball(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of `e8_ball()` for each 8-vector of x (..., 8): codes (...) int32 in [0, 255]; exact in
    float64 like `encode`, ties to the lowest code."""
    _check_vectors(x, "e8p.encode_ball")
    flat = x.detach().reshape(-1, DIM).to(torch.float64, memory_format=torch.contiguous_format)  # strided: 2x slower
    out = torch.empty(flat.shape[0], dtype=torch.int32)
    for i in range(0, flat.shape[0], _CHUNK):
        out[i:i + _CHUNK] = _encode_ball_rows(flat[i:i + _CHUNK])
    return out.reshape(x.shape[:-1])


def decode_ball(codes: torch.Tensor) -> torch.Tensor:
    """Points (..., 8) float32 of `e8_ball` codes (...) in [0, 255]."""
    return e8_ball()[_check_codes(codes, 256, "e8p.decode_ball")]


# ----------------------------------------------------------------------------- 2, 3 and 4 bits per weight

E8_BITS = (2, 3, 4)
# Scale of the residual codebook: ŵ = s·(C₁[c₁] + C₂[c₂]/ratio). Powers of two, so decoded values stay exact
# sums of small dyadic numbers: 4 bits: 16·(C₁ + C₂/4) = 4·(4C₁) + 4C₂, odd integers in [-55, 55];
# 3 bits: 4·(C₁ + C₂/2) = 4C₁ + 2C₂, integers in [-15, 15]. On Gaussian data the best free ratios (3.6 and
# 2.05: MSE 0.00848 and 0.02966) are no better than 4 and 2 (0.00845, 0.02969) once the scale is retuned.
RESIDUAL_RATIO = {3: 2.0, 4: 4.0}
# rms(row) / s at the least MSE on Gaussian rows (measured on 32768 vectors): the starting point of the scale
# search. The 4-bit optimum is lower: the residual stage covers the large values that the first one clips.
GAUSSIAN_SCALE = {2: 1.04, 3: 0.98, 4: 0.87}


@dataclass(frozen=True)
class E8Format:
    """E8P (2 bits), E8P + 1-bit E8 residual (3 bits) or E8P + E8P residual (4 bits), per 8 weights.

    Codes have shape (..., groups, stages) int32: stage 0 an E8P code, stage 1 (3 and 4 bits) the residual code
    (an `e8_ball` index at 3 bits, an E8P code at 4 bits). Values at scale 1: C₁[c₁] + C₂[c₂]/ratio.
    """

    bits: int

    def __post_init__(self):
        if self.bits not in E8_BITS:
            raise LowbitError(f"E8 format with {self.bits} bits per weight: supported are {E8_BITS}")

    @property
    def name(self) -> str:
        return "e8p" if self.bits == 2 else f"e8p-rvq{self.bits}"

    @property
    def stages(self) -> int:
        return 1 if self.bits == 2 else 2

    @property
    def ratio(self) -> float | None:
        return RESIDUAL_RATIO.get(self.bits)

    @property
    def gaussian_scale(self) -> float:
        return GAUSSIAN_SCALE[self.bits]

    @property
    def bytes_per_group(self) -> int:
        """Stored bytes per 8 weights: 2, 3 or 4."""
        return self.bits

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (..., stages) int32, values (..., 8) float32) for x (..., 8) at scale 1: the nearest E8P
        codeword, then the nearest residual codeword to ratio·(x − C₁[c₁]) (greedy, as in QuIP#)."""
        c1 = encode(x)
        v1 = codebook()[c1.long()]
        if self.bits == 2:
            return c1.unsqueeze(-1), v1
        r = (x.detach().to(torch.float64) - v1.to(torch.float64)) * self.ratio
        c2 = encode_ball(r) if self.bits == 3 else encode(r)
        v2 = (e8_ball() if self.bits == 3 else codebook())[c2.long()]
        return torch.stack([c1, c2], dim=-1), v1 + v2 / self.ratio

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (..., stages) -> values (..., 8) float32 at scale 1 (exact: see RESIDUAL_RATIO)."""
        if codes.dim() < 1 or codes.shape[-1] != self.stages:
            raise LowbitError(f"{self.name}: expected codes of shape (..., {self.stages}), got {tuple(codes.shape)}")
        v = decode(codes[..., 0])
        if self.bits == 3:
            v = v + decode_ball(codes[..., 1]) / self.ratio
        elif self.bits == 4:
            v = v + decode(codes[..., 1]) / self.ratio
        return v


def e8_format(bits: int) -> E8Format:
    return E8Format(bits)


def pack_codes(codes: torch.Tensor, fmt: E8Format) -> torch.Tensor:
    """Codes (..., groups, stages) -> uint8 (..., groups·bytes_per_group). Each group is one little-endian
    integer c₁ | c₂ << 16 (2, 3 or 4 bytes), lowest byte first, as `packing.pack` stores its groups."""
    if codes.dim() < 2 or codes.shape[-1] != fmt.stages:
        raise LowbitError(f"pack_codes: {fmt.name} codes must have shape (..., groups, {fmt.stages}), "
                          f"got {tuple(codes.shape)}")
    c = _check_codes(codes[..., 0], N_CODES, "pack_codes")
    if fmt.stages == 2:
        c = c | (_check_codes(codes[..., 1], 256 if fmt.bits == 3 else N_CODES, "pack_codes") << 16)
    shifts = torch.arange(fmt.bytes_per_group, dtype=torch.int64) * 8
    out = (c.unsqueeze(-1) >> shifts) & 0xFF
    return out.reshape(*codes.shape[:-2], -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, fmt: E8Format) -> torch.Tensor:
    """Exact inverse of `pack_codes`: uint8 (..., groups·bytes_per_group) -> int32 (..., groups, stages)."""
    nb = fmt.bytes_per_group
    if packed.dtype != torch.uint8 or packed.dim() < 1 or packed.shape[-1] % nb:
        raise LowbitError(f"unpack_codes: expected uint8 bytes, {nb} per group of {DIM} weights, along the last "
                          f"dimension; got {packed.dtype} of shape {tuple(packed.shape)}")
    b = packed.reshape(*packed.shape[:-1], -1, nb).to(torch.int64)
    word = (b << (torch.arange(nb, dtype=torch.int64) * 8)).sum(dim=-1)
    parts = [word & 0xFFFF] + ([word >> 16] if fmt.stages == 2 else [])
    return torch.stack(parts, dim=-1).to(torch.int32)


def bits_per_weight(fmt: E8Format, in_features: int) -> float:
    """Stored bits per weight: codes plus one float16 scale per row of in_features weights."""
    return (8 * fmt.bytes_per_group * in_features // DIM + 16) / in_features


# ----------------------------------------------------------------------------- as 4-bit integer digits

# Every E8 format's value at scale 1 is Σ_stage mult·(digit − DIGIT_ZERO) with 4-bit digits in [0, 15]: the codes run
# on an integer 4-bit kernel with zero 7.5 and row scale s·mult, one row block per stage (summed):
#   2 bits: C₁ = (c − 7.5)/2, c = 2C₁ + 7.5 ∈ [2, 13];
#   3 bits: C₁ + C₂/2 = v/4 with v = 4C₁ + 2C₂ an integer in [−15, 15], split as v = (c₁ − 7.5) + (c₂ − 7.5);
#   4 bits: C₁ + C₂/4 = (c₁ − 7.5)/2 + (c₂ − 7.5)/8 with c = 2C + 7.5 for both E8P stages.
DIGIT_ZERO = 7.5
DIGIT_MULTIPLIERS = {2: (0.5,), 3: (0.25, 0.25), 4: (0.5, 0.125)}


def int4_digits(codes: torch.Tensor, fmt: E8Format) -> torch.Tensor:
    """Codes (rows, groups, stages) -> uint8 digits (stages, rows, groups·8) in [0, 15] such that
    fmt.dequantize(codes) = Σ_stage DIGIT_MULTIPLIERS[bits][stage]·(digit − DIGIT_ZERO), exactly."""
    if codes.dim() != 3 or codes.shape[-1] != fmt.stages:
        raise LowbitError(f"int4_digits: {fmt.name} codes must have shape (rows, groups, {fmt.stages}), "
                          f"got {tuple(codes.shape)}")
    rows = codes.shape[0]
    if fmt.bits == 3:
        v = (4 * fmt.dequantize(codes)).round().reshape(rows, -1) + 15  # 4C₁ + 2C₂ + 15 ∈ [0, 30]
        first = v.clamp(max=15)
        digits = torch.stack([first, v - first])
    else:
        per_stage = [decode(codes[..., 0])] + ([decode(codes[..., 1])] if fmt.stages == 2 else [])
        digits = torch.stack([(2 * c + DIGIT_ZERO).reshape(rows, -1) for c in per_stage])
    return digits.to(torch.uint8)


# ----------------------------------------------------------------------------- digits from the code bytes, by tables

@dataclass(frozen=True)
class DigitTables:
    """Small int8 tables that give an E8P code's 4-bit digits from its two bytes (lo = code & 0xFF, hi = code >> 8)
    with two gathers, a product and a sum, the decode formula of the module docstring rearranged for graphs without
    bit counts (exporters: ONNX, ExecuTorch):

        digit = magnitudes[hi] ⊙ signs[lo] + offsets[lo]          (= 2·C + 7.5, an integer in [2, 13])

    magnitudes[hi] = 2·abs_grid[hi] (1, 3 or 5) with coordinate 0 negated where abs_parity[hi] is odd; signs[lo] = ±1
    from bits 1..7 of lo, coordinate 0 (−1)^popcount(lo & 0xFE) (the parity's sign-bit half); offsets[lo] = 7 + (lo & 1)
    (the ±¼ shift, doubled, plus 7.5). The 1-bit residual codebook of 3 bits (`e8_ball`) doubled: `ball`, integers in
    [-4, 4] (3 bits: 4C₁ + 2C₂ + 15 = 2·digit₁ + ball[c₂], see int4_digits). 4.3 KB in all."""

    magnitudes: torch.Tensor  # int8 (256, 8)
    signs: torch.Tensor  # int8 (256, 8)
    offsets: torch.Tensor  # int8 (256,)
    ball: torch.Tensor  # int8 (256, 8)


@cache
def digit_tables() -> DigitTables:
    """The tables of `DigitTables` (cached: do not modify)."""
    mags = (2 * abs_grid()).to(torch.int8)
    mags[:, 0] *= (1 - 2 * abs_parity()).to(torch.int8)
    lo = torch.arange(256)
    neg = (lo[:, None] >> torch.arange(DIM)) & 1
    neg[:, 0] = neg[:, 1:].sum(dim=-1) & 1
    signs = (1 - 2 * neg).to(torch.int8)
    offsets = (7 + (lo & 1)).to(torch.int8)
    return DigitTables(mags, signs, offsets, (2 * e8_ball()).to(torch.int8))


def digits_from_bytes(packed: torch.Tensor, fmt: E8Format, tables: DigitTables | None = None) -> torch.Tensor:
    """`int4_digits` computed the way the exported graphs do, from `pack_codes` bytes (rows, groups·bytes_per_group)
    through `digit_tables()`: uint8 digits (stages, rows, groups·8), equal to int4_digits(unpack_codes(packed))."""
    t = digit_tables() if tables is None else tables
    rows = packed.shape[0]
    b = packed.reshape(rows, -1, fmt.bytes_per_group).to(torch.int64)

    def e8p_digits(lo, hi):
        return t.magnitudes[hi].to(torch.int32) * t.signs[lo].to(torch.int32) + t.offsets[lo].to(torch.int32)[..., None]

    d1 = e8p_digits(b[..., 0], b[..., 1])
    if fmt.bits == 2:
        stages = [d1]
    elif fmt.bits == 3:
        v = 2 * d1 + t.ball[b[..., 2]].to(torch.int32)
        first = v.clamp(max=15)
        stages = [first, v - first]
    else:
        stages = [d1, e8p_digits(b[..., 2], b[..., 3])]
    return torch.stack([d.reshape(rows, -1) for d in stages]).to(torch.uint8)
