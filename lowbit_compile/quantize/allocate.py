"""Budget solver: one option per unit so that the stored bits fit a target average bits per weight and the
summed loss is least. A multiple-choice knapsack (MCKP).

A unit is whatever the caller groups (a linear, a fused q/k/v group, a whole block); each option carries its
exact stored bits (codes + scales + sign bits, as saved) and a loss. Bits are integers, so "never exceeds the
budget" is checked exactly, without floating tolerance.

1. Per unit, drop dominated options (more bits, no less loss) and take the lower convex hull (options above
   it are LP-dominated: some mix of two neighbours is better at the same bits).
2. Lagrangian bisection: for λ, each unit minimizes loss + λ·bits over its hull; total bits fall as λ grows,
   so bisect over the hull's breakpoints for the least λ that fits.
3. Greedy fill of what is left by the best loss decrease per bit, over all non-dominated options.
4. Pairwise swaps: change two units at once when that fits and lowers the loss; fill again; repeat.
5. Branch and bound with the LP bound from the hulls, started from that solution: exact when it finishes
   within `node_limit` nodes (always on small instances), else the heuristic answer is kept (`exact=False`).

With equal unit sizes, two options and loss(low) − loss(high) given by a score, the optimum is LayerwiseQuant's
sorted threshold: the k highest-scoring units get the high option, k as large as the budget allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from ..errors import LowbitError

DEFAULT_NODE_LIMIT = 100_000
WORK_LIMIT = 20_000_000  # bound-computation steps the branch and bound may take (a few seconds)


@dataclass(frozen=True)
class Option:
    """One choice for a unit: its name (e.g. "w3-quip", "float"), exact stored bits, loss, and a payload."""

    name: str
    bits: int
    loss: float
    payload: object = field(default=None, compare=False)


@dataclass(frozen=True)
class Unit:
    """What the solver assigns one option to. `weights` counts the unit's weights (for bits per weight)."""

    name: str
    weights: int
    options: tuple[Option, ...]


@dataclass
class Allocation:
    choice: dict[str, Option]  # unit name -> chosen option
    bits: int  # total stored bits of the choice
    loss: float
    budget: int  # the most bits allowed: floor(target × weights)
    weights: int
    exact: bool  # proven optimal (branch and bound finished)
    lam: float  # the Lagrange multiplier where the bisection stopped (loss per bit)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


def solve(units: list[Unit], target_bpw: float, node_limit: int = DEFAULT_NODE_LIMIT) -> Allocation:
    """Least total loss with total bits ≤ floor(target_bpw × total weights). Raises LowbitError when even the
    cheapest option of every unit does not fit, naming the least achievable bits per weight."""
    _check(units)
    weights = sum(u.weights for u in units)
    # the target as written (str: 2.3 is 23/10, not the nearest double); 1e-9 bit of slack absorbs a target
    # computed in floating point (55/3 bits/weight for 3 weights is 54.999999999999996 bits)
    budget = math.floor(Fraction(str(target_bpw)) * weights + Fraction(1, 10**9))
    least = sum(min(o.bits for o in u.options) for u in units)
    if least > budget:
        raise LowbitError(
            f"target {target_bpw} bits/weight is below what these options can reach: the cheapest choice for "
            f"every unit takes {least / weights:.4f} bits/weight (scales and sign bits included); raise the "
            f"target to at least {math.ceil(least / weights * 1000) / 1000}, add a cheaper candidate format, or "
            f"unpin layers forced to a wide format or to float"
        )
    fronts = [_frontier(u.options) for u in units]
    hulls = [_hull(f) for f in fronts]
    pick, lam = _lagrangian(hulls, budget)
    pick = [fronts[i].index(hulls[i][k]) for i, k in enumerate(pick)]
    pick = _improve(fronts, pick, budget)
    pick, exact = _branch_and_bound(fronts, hulls, budget, pick, node_limit)
    chosen = [f[k] for f, k in zip(fronts, pick)]
    return Allocation(choice={u.name: o for u, o in zip(units, chosen)}, bits=sum(o.bits for o in chosen),
                      loss=math.fsum(o.loss for o in chosen), budget=budget, weights=weights, exact=exact,
                      lam=lam)


def _check(units: list[Unit]) -> None:
    if not units:
        raise LowbitError("nothing to allocate: no units were given (is every layer pinned or kept in float?)")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise LowbitError(f"unit names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    for u in units:
        if u.weights <= 0 or not u.options:
            raise LowbitError(f"unit {u.name}: needs a positive weight count and at least one option")
        for o in u.options:
            if not isinstance(o.bits, int) or o.bits < 0 or not math.isfinite(o.loss):
                raise LowbitError(f"unit {u.name}, option {o.name}: bits must be a non-negative int (exact stored "
                                  f"bits) and loss finite; got bits={o.bits!r}, loss={o.loss!r}")


def _frontier(options) -> list[Option]:
    """Options by increasing bits with strictly decreasing loss (the rest are dominated)."""
    out = []
    for o in sorted(options, key=lambda o: (o.bits, o.loss)):
        if not out or o.loss < out[-1].loss and o.bits > out[-1].bits:
            out.append(o)
    return out


def _hull(front: list[Option]) -> list[Option]:
    """The lower convex hull of a frontier: slopes (loss decrease per bit) strictly decreasing."""
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    """Loss decrease per extra bit from a to b (b has more bits)."""
    return (a.loss - b.loss) / (b.bits - a.bits)


def _pick_at(hulls, lam: float) -> list[int]:
    """Per unit, the hull option minimizing loss + lam·bits (ties go to the cheaper option)."""
    out = []
    for h in hulls:
        k = 0
        while k + 1 < len(h) and _slope(h[k], h[k + 1]) > lam:
            k += 1
        out.append(k)
    return out


def _lagrangian(hulls, budget: int) -> tuple[list[int], float]:
    """Bisection over the hull breakpoints for the least λ whose choice fits the budget."""
    lams = sorted({0.0} | {_slope(h[k], h[k + 1]) for h in hulls for k in range(len(h) - 1)})
    lo, hi = 0, len(lams) - 1  # the largest λ picks every cheapest option, which fits (checked by the caller)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(h[k].bits for h, k in zip(hulls, _pick_at(hulls, lams[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return _pick_at(hulls, lams[lo]), lams[lo]


def _improve(fronts, pick: list[int], budget: int) -> list[int]:
    """Greedy fill, then pairwise swaps with a fill after each, until nothing lowers the loss."""
    pick = _fill(fronts, list(pick), budget)
    while True:
        better = _best_pair_move(fronts, pick, budget)
        if better is None:
            return pick
        (i, a), (j, b) = better
        pick[i], pick[j] = a, b
        pick = _fill(fronts, pick, budget)


def _fill(fronts, pick: list[int], budget: int) -> list[int]:
    used = sum(f[k].bits for f, k in zip(fronts, pick))
    while True:
        best, move = 0.0, None
        for i, (f, k) in enumerate(zip(fronts, pick)):
            for a in range(k + 1, len(f)):
                extra = f[a].bits - f[k].bits
                if used + extra > budget:
                    break
                rate = (f[k].loss - f[a].loss) / extra
                if rate > best:
                    best, move = rate, (i, a, extra)
        if move is None:
            return pick
        i, a, extra = move
        pick[i], used = a, used + extra


def _best_pair_move(fronts, pick: list[int], budget: int):
    """The pair of option changes that fits and lowers the loss most, or None."""
    used = sum(f[k].bits for f, k in zip(fronts, pick))
    changes = [[(a, f[a].bits - f[k].bits, f[a].loss - f[k].loss) for a in range(len(f)) if a != k]
               for f, k in zip(fronts, pick)]
    # gains below rounding noise of the total loss are not moves: they could cycle
    best, move = 1e-12 * math.fsum(abs(o.loss) for f in fronts for o in f), None
    for i in range(len(fronts)):
        for a, db_a, dl_a in changes[i]:
            for j in range(i + 1, len(fronts)):
                for b, db_b, dl_b in changes[j]:
                    gain = -(dl_a + dl_b)
                    if gain > best and used + db_a + db_b <= budget:
                        best, move = gain, ((i, a), (j, b))
    return move


def _branch_and_bound(fronts, hulls, budget: int, start: list[int], node_limit: int) -> tuple[list[int], bool]:
    """Depth-first search over units (widest loss range first) pruned by the LP bound; the incumbent starts at
    `start`. Returns (best choice, finished). The search stops after `node_limit` nodes, or fewer on large
    instances so that it stays within about WORK_LIMIT steps of bound computation."""
    n = len(fronts)
    order = sorted(range(n), key=lambda i: fronts[i][0].loss - fronts[i][-1].loss, reverse=True)
    pos = {u: d for d, u in enumerate(order)}
    # LP relaxation of the units from depth d on: start at each hull's cheapest, add hull segments by slope
    segments = sorted(((pos[i], h[k + 1].bits - h[k].bits, h[k].loss - h[k + 1].loss)
                       for i, h in enumerate(hulls) for k in range(len(h) - 1)),
                      key=lambda s: s[2] / s[1], reverse=True)
    node_limit = min(node_limit, max(1000, WORK_LIMIT // (len(segments) + 1)))
    base_bits = [0] * (n + 1)
    base_loss = [0.0] * (n + 1)
    for d in range(n - 1, -1, -1):
        base_bits[d] = base_bits[d + 1] + hulls[order[d]][0].bits
        base_loss[d] = base_loss[d + 1] + hulls[order[d]][0].loss

    def bound(d: int, room: int) -> float:
        room -= base_bits[d]
        if room < 0:
            return math.inf
        gain = 0.0
        for depth, db, dl in segments:
            if depth < d:
                continue
            if db <= room:
                room -= db
                gain += dl
            else:
                gain += dl * room / db
                break
        return base_loss[d] - gain

    by_loss = [sorted(range(len(fronts[u])), key=lambda k, f=fronts[u]: f[k].loss) for u in order]
    best_pick = list(start)
    best_loss = math.fsum(f[k].loss for f, k in zip(fronts, start))
    tol = 1e-12 * max(1.0, abs(best_loss))
    chosen = [0] * n
    stack = [(0, -1, 0, 0.0)]  # (depth, option taken by the unit at depth - 1, bits used, loss so far)
    nodes = 0
    while stack:
        d, k, used, loss = stack.pop()
        if d:
            chosen[d - 1] = k  # the ancestors' choices are already in place: the stack is depth first
        nodes += 1
        if nodes > node_limit:
            return best_pick, False
        if d == n:
            if loss < best_loss - tol:
                best_loss = loss
                for depth, c in enumerate(chosen):
                    best_pick[order[depth]] = c
            continue
        if loss + bound(d, budget - used) >= best_loss - tol:
            continue
        f = fronts[order[d]]
        for c in reversed(by_loss[d]):  # the least-loss option is explored first
            if used + f[c].bits + base_bits[d + 1] <= budget:
                stack.append((d + 1, c, used + f[c].bits, loss + f[c].loss))
    return best_pick, True
