"""The budget solver: never over budget, within one step of it, optimal on small instances, and LayerwiseQuant's
sorted threshold in the two-format, whole-block case."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize.allocate import Option, Unit, solve


@st.composite
def instances(draw, max_units=8, max_options=4):
    """Random units with integer stored bits and float losses, and a target between the least reachable bits
    per weight and a little above the most."""
    n = draw(st.integers(1, max_units))
    units = []
    for i in range(n):
        k = draw(st.integers(1, max_options))
        bits = draw(st.lists(st.integers(1, 5000), min_size=k, max_size=k))
        # losses on a 0.01 grid: differences far above rounding noise, ties still possible
        losses = draw(st.lists(st.integers(0, 10_000).map(lambda v: v / 100), min_size=k, max_size=k))
        units.append(Unit(f"u{i}", draw(st.integers(1, 500)),
                          tuple(Option(f"o{j}", b, loss) for j, (b, loss) in enumerate(zip(bits, losses)))))
    weights = sum(u.weights for u in units)
    least = sum(min(o.bits for o in u.options) for u in units) / weights
    most = sum(max(o.bits for o in u.options) for u in units) / weights
    target = draw(st.floats(least, most * 1.1 + 1e-9, allow_nan=False))
    return units, max(target, least)


def _fits_no_upgrade(units, alloc):
    """No unit can move to an option with strictly less loss within the bits left over."""
    left = alloc.budget - alloc.bits
    for u in units:
        cur = alloc.choice[u.name]
        for o in u.options:
            if o.loss < cur.loss and o.bits - cur.bits <= left:
                return False
    return True


def _exhaustive(units, budget):
    best = math.inf
    for combo in itertools.product(*(u.options for u in units)):
        if sum(o.bits for o in combo) <= budget:
            best = min(best, math.fsum(o.loss for o in combo))
    return best


@settings(max_examples=150, deadline=None)
@given(instances())
def test_never_over_budget_and_within_one_step_of_it(inst):
    units, target = inst
    for node_limit in (0, 100_000):  # the heuristic alone, then with branch and bound
        alloc = solve(units, target, node_limit=node_limit)
        assert alloc.bits <= alloc.budget <= target * alloc.weights + 1e-6
        assert alloc.bits == sum(o.bits for o in alloc.choice.values())
        assert alloc.bits_per_weight <= target + 1e-12
        assert _fits_no_upgrade(units, alloc)  # what is left is smaller than any step that would help


@settings(max_examples=150, deadline=None)
@given(instances(max_units=6, max_options=3))
def test_equals_exhaustive_search_on_small_instances(inst):
    units, target = inst
    alloc = solve(units, target)
    assert alloc.exact
    best = _exhaustive(units, alloc.budget)
    assert alloc.loss == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_branch_and_bound_beats_the_heuristic_where_it_falls_short():
    # found by random search (2 in 3000 small instances): greedy + pairwise swaps stop at 76, the optimum is 73
    table = [[(5, 14.0), (6, 9.0), (2, 20.0)], [(19, 9.0), (2, 19.0)], [(11, 9.0), (2, 15.0), (3, 29.0)],
             [(24, 20.0)], [(25, 19.0), (13, 29.0), (23, 20.0)]]
    units = [Unit(f"u{i}", 1, tuple(Option(f"o{k}", b, loss) for k, (b, loss) in enumerate(row)))
             for i, row in enumerate(table)]
    heuristic = solve(units, 74 / 5, node_limit=0)
    exact = solve(units, 74 / 5)
    assert (heuristic.loss, heuristic.exact) == (76.0, False)
    assert (exact.loss, exact.exact) == (73.0, True) and exact.loss == _exhaustive(units, 74)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=2, max_size=12, unique=True),
       st.floats(0, 1), st.sampled_from([(2, 4), (2, 3), (3, 4)]), st.booleans())
def test_two_formats_and_whole_blocks_reduce_to_layerwisequant_sorted_threshold(scores, frac, formats, exact):
    """LayerwiseQuant: rank equal-size blocks by importance, give the top k the high format, k as many as the
    budget allows. The solver reproduces it when block i's loss drop from low to high bits is its score:
    every block costs the same Δbits to upgrade, so the upgrades that fit are at most k = ⌊(B − N·low) /
    Δbits⌋; any feasible choice of j upgrades has loss Σ loss_low − Σ_(upgraded) score, least when the j
    upgraded blocks are the j highest scores, and every upgrade lowers the loss, so j = k. The absolute
    losses (here a per-block offset unrelated to the ranking) do not matter, only the differences."""
    lo, hi = formats
    n, size = len(scores), 1000
    overhead = 37  # scale and sign bits per block, the same at both widths
    units = [Unit(f"block{i}", size, (Option("low", lo * size + overhead, 5.0 * (i % 3) + s),
                                      Option("high", hi * size + overhead, 5.0 * (i % 3))))
             for i, s in enumerate(scores)]
    least = n * (lo * size + overhead)
    budget_bits = least + frac * n * (hi - lo) * size
    target = budget_bits / (n * size)
    alloc = solve(units, target, node_limit=100_000 if exact else 0)
    k = (alloc.budget - least) // ((hi - lo) * size)
    ranked = sorted(range(n), key=lambda i: scores[i], reverse=True)
    assert {u for u, o in alloc.choice.items() if o.name == "high"} == {f"block{i}" for i in ranked[:k]}


def test_dominated_options_are_never_chosen_and_pins_count_toward_the_budget():
    pinned = Unit("pinned.float", 100, (Option("float", 3200, 0.0),))
    free = Unit("free", 100, (Option("w2", 200, 5.0), Option("w3", 300, 2.0), Option("w3-bad", 400, 3.0),
                              Option("w4", 500, 1.0)))
    alloc = solve([pinned, free], (3200 + 450) / 200)
    assert alloc.choice["pinned.float"].name == "float"
    assert alloc.choice["free"].name == "w3"  # w4 does not fit beside the pinned float layer; w3-bad never
    assert alloc.bits == 3500


def test_a_budget_below_the_cheapest_assignment_names_the_least_reachable_bits():
    units = [Unit("a", 100, (Option("w2", 205, 1.0), Option("w4", 405, 0.0)))]
    with pytest.raises(LowbitError, match=r"below what these options can reach.*2\.0500 bits/weight.*at least 2\.05"):
        solve(units, 2.0)


def test_bad_units_are_refused_with_their_name():
    with pytest.raises(LowbitError, match="unit a, option x: bits must be a non-negative int"):
        solve([Unit("a", 10, (Option("x", 2.5, 0.0),))], 3)
    with pytest.raises(LowbitError, match="unique; repeated: \\['a'\\]"):
        solve([Unit("a", 10, (Option("x", 2, 0.0),))] * 2, 3)
    with pytest.raises(LowbitError, match="nothing to allocate"):
        solve([], 3)


def test_a_target_above_every_maximum_takes_the_best_option_everywhere():
    units = [Unit(f"u{i}", 10, (Option("w2", 20, 3.0), Option("w4", 40, 1.0))) for i in range(3)]
    alloc = solve(units, 8.0)
    assert all(o.name == "w4" for o in alloc.choice.values()) and alloc.bits == 120 and alloc.lam == 0.0
