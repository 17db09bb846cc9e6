"""quantize/core.py: the one per-layer loop under lb.quantize and the backend."""

import pytest
import torch

from lowbit_compile.calibrate import HessianAccumulator, LayerStats
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize.core import NO_DATA, Layer, precheck, quantize_linears
from lowbit_compile.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _w(out, inp, seed):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _stats(n, tokens=64, seed=0, owner=""):
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed))
    h = (x.T.double() @ x.double()) / tokens
    return LayerStats(h, x.abs().amax(0), tokens, x, owner)


def test_float_layers_and_missing_data_are_rows_with_their_reasons():
    recipe = Recipe.parse("w3-quip", {"b": None})
    rows = quantize_linears([Layer("a", _w(8, 16, 0), _stats(16)), Layer("b", _w(8, 16, 1), _stats(16)),
                             Layer("c", _w(8, 16, 2), None)], recipe)
    assert [r.fqn for r in rows] == ["a", "b", "c"]
    assert rows[0].quantized and rows[0].record.bits == 3 and rows[0].reason == "recipe default"
    assert not rows[1].quantized and rows[1].spec is None and "override" in rows[1].reason
    assert not rows[2].quantized and rows[2].reason == NO_DATA
    assert rows[0].shape == (8, 16)


def test_fp4_layers_fed_one_input_are_quantized_as_one_group(monkeypatch):
    from lowbit_compile.quantize import core

    groups = []
    real = core.quantize_fp4_group
    monkeypatch.setattr(core, "quantize_fp4_group", lambda layers, *a, **k: (groups.append(sorted(layers)),
                                                                             real(layers, *a, **k))[1])
    st = _stats(32, tokens=128, owner="q")
    other = _stats(32, tokens=128, seed=1, owner="o")
    layers = [Layer("q", _w(16, 32, 0), st, "x"), Layer("o", _w(16, 32, 2), other), Layer("k", _w(16, 32, 1), st, "x")]
    rows = quantize_linears(layers, Recipe.parse("fp4"))
    assert [r.fqn for r in rows] == ["q", "o", "k"] and all(r.quantized for r in rows)
    assert groups == [["k", "q"], ["o"]]  # one call per input: shared exponents (quantize.layer.quantize_fp4_group)


def test_the_cache_is_asked_first_and_statistics_are_made_only_when_needed():
    asked = []

    def stats():
        asked.append(1)
        return _stats(16)

    made = {}

    def cache(weight, key, make):
        if key[0] in made:
            return made[key[0]], True
        made[key[0]] = make()
        return made[key[0]], False

    w = _w(8, 16, 0)
    first = quantize_linears([Layer("a", w, stats)], Recipe.parse("w2-quip"), cache=cache)
    again = quantize_linears([Layer("a", w, stats)], Recipe.parse("w2-quip"), cache=cache)
    assert not first[0].cached and again[0].cached and again[0].record is first[0].record
    assert asked == [1]  # the second call found the record: no calibration
    quantize_linears([Layer("b", _w(8, 16, 1), stats)], Recipe.parse("w4"))
    assert asked == [1]  # a data-free recipe never asks


def test_on_record_sees_each_record_as_it_is_made():
    seen = []
    quantize_linears([Layer("a", _w(8, 16, 0)), Layer("b", _w(8, 16, 1))], Recipe.parse("w4"),
                     on_record=lambda fqn, rec: seen.append((fqn, rec.fqn)))
    assert seen == [("a", "a"), ("b", "b")]


def test_observer_accumulators_work_as_statistics():
    acc = HessianAccumulator(16, "a")
    acc.add(torch.randn(40, 16))
    rows = quantize_linears([Layer("a", _w(8, 16, 0), acc)], Recipe.parse("w2-optq"))
    assert rows[0].quantized and rows[0].record.method == "optq"


def test_precheck_fails_before_calibration_and_names_the_layer():
    bad = _w(8, 16, 0)
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=r"layer a: weight has 1 NaN"):
        precheck([Layer("a", bad)], Recipe.parse("w4"))
    precheck([Layer("a", bad)], Recipe.parse("w4", {"a": None}))  # kept float: not checked
    with pytest.raises(LowbitError, match=r"layer b: group size 64 does not divide in_features=48"):
        precheck([Layer("b", lambda: 1 / 0, shape=(8, 48))], Recipe.parse("w4-g64"), weights=False)


def test_errors_of_one_layer_name_it():
    with pytest.raises(LowbitError, match=r"^layer a: "):
        quantize_linears([Layer("a", _w(8, 16, 0), LayerStats(torch.zeros(3, 3, dtype=torch.float64),
                                                              torch.zeros(3), 5))], Recipe.parse("w2-quip"))
