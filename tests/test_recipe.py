import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit_compile.errors import LowbitError
from lowbit_compile.recipe import LayerSpec, Recipe, parse_spec, valid_recipe_names


def test_short_names_parse_into_specs():
    assert parse_spec("w4") == LayerSpec(bits=4, method="rtn", rotate=True, group_size=0)
    assert parse_spec("w2-rtn") == LayerSpec(bits=2, method="rtn", rotate=False)
    assert parse_spec("W3-g64") == LayerSpec(bits=3, rotate=True, group_size=64)
    assert all(parse_spec(n) for n in valid_recipe_names())


@pytest.mark.parametrize("bad", ["w5", "int4", "w4-magic", "w", "", "w4-g"])
def test_unknown_recipe_lists_the_valid_ones(bad):
    with pytest.raises(LowbitError, match="valid recipes: .*w4"):
        parse_spec(bad)


@given(st.text(max_size=12))
def test_parsing_arbitrary_text_either_succeeds_or_raises_lowbit_error(text):
    try:
        spec = parse_spec(text)
    except LowbitError:
        return
    assert spec.bits in (2, 3, 4, 8)


def test_overrides_resolve_exact_then_pattern_then_default():
    r = Recipe.parse("w4", {"re:.*mlp\\..*": "w2", "model.layers.0.mlp.down_proj": "w8",
                            "re:.*k_proj": None, "_default": "w3"})
    assert r.spec_for("model.layers.0.mlp.down_proj")[0].bits == 8
    assert r.spec_for("model.layers.1.mlp.down_proj")[0].bits == 2
    assert r.spec_for("model.layers.1.self_attn.k_proj")[0] is None
    assert r.spec_for("model.layers.1.self_attn.q_proj")[0].bits == 3


def test_output_head_stays_float_unless_named():
    assert Recipe.parse("w4").spec_for("lm_head") == (None, pytest.approx(
        "output head kept in float by default (override its name to quantize it)"))
    assert Recipe.parse("w4", {"lm_head": "w8"}).spec_for("lm_head")[0].bits == 8


def test_bad_override_pattern_and_bits_are_clear_errors():
    with pytest.raises(LowbitError, match="not a valid regular expression"):
        Recipe.parse("w4", {"re:(": "w2"})
    with pytest.raises(LowbitError, match="5-bit weights are not supported"):
        LayerSpec(bits=5)
    with pytest.raises(LowbitError, match="recipe must be a string"):
        Recipe.parse(4)


def test_bpw_recipes_parse_to_a_mixed_precision_budget():
    r = Recipe.parse("2.5bpw", {"re:.*down_proj": "w4-quip", "lm_head": None}, seed=7)
    assert r.target_bpw == 2.5 and r.default is None and r.seed == 7 and r.needs_calibration
    assert r.candidates == ("w2-quip", "w3-quip", "w4-quip") and r.unit == "linear"
    assert dict(r.overrides) == {"re:.*down_proj": parse_spec("w4-quip"), "lm_head": None}
    assert Recipe.parse("3.25bpw+fp4").candidates[-1] == "w4a16-fp4"
    m = Recipe.mixed(3, candidates=("w2-rtn", "w4-rtn"), unit="block")
    assert (m.name, m.target_bpw, m.unit) == ("3bpw", 3.0, "block")
    with pytest.raises(LowbitError, match="without a plan yet.*lb.quantize"):
        r.spec_for("model.layers.0.mlp.up_proj")
    with pytest.raises(LowbitError, match="'_default' cannot set a format"):
        Recipe.parse("2.5bpw", {"_default": "w4"})
    with pytest.raises(LowbitError, match="unit 'layer'"):
        Recipe.mixed(2.5, unit="layer")
    with pytest.raises(LowbitError, match="unknown recipe 'w5'"):
        Recipe.mixed(2.5, candidates=("w5",))
    with pytest.raises(LowbitError, match=r"in \[1, 16\]"):
        Recipe.mixed(0.5)
    with pytest.raises(LowbitError, match="unknown recipe '2.5 bpw'"):
        Recipe.parse("2.5 bpw")


def test_e8_recipes_and_the_fine_tuning_suffix():
    import lowbit_compile  # noqa: F401  (quantize/layer.py registers the method "e8")

    assert parse_spec("w2-e8") == LayerSpec(bits=2, method="e8", rotate=True, bias_correct=True)
    assert parse_spec("W3-E8-FT") == LayerSpec(bits=3, method="e8", rotate=True, finetune=True)  # tuning instead
    assert parse_spec("w4-e8").needs_calibration and Recipe.parse("w2-e8-ft").needs_calibration
    assert parse_spec("w2-e8-ft").describe() == "e8p2 e8 + fine-tuning"
    assert parse_spec("w2-e8").describe() == "e8p2 e8 + bias correction"
    assert not parse_spec("w2-quip").bias_correct and LayerSpec(bits=2, method="quip", bias_correct=True).bias_correct
    with pytest.raises(LowbitError, match="bias correction needs a calibrated LDLQ method"):
        LayerSpec(bits=4, method="rtn", bias_correct=True)
    assert parse_spec("w4-g128") == LayerSpec(bits=4, rotate=True, group_size=128)  # -g is not a method name
    names = valid_recipe_names()
    assert {"w2-e8", "w3-e8", "w4-e8", "w2-e8-ft", "w4-e8-ft"} <= set(names)
    assert "w8-e8" not in names and "w2-quip-ft" not in names
    for bad, why in [("w8-e8", r"method 'e8' quantizes to \(2, 3, 4\) bits per weight, not 8"),
                     ("w2-e8-g64", "method 'e8' has one scale per output row"),
                     ("w2-quip-ft", r"fine-tuning \(-ft\) is implemented for the methods \['e8'\], not 'quip'"),
                     ("w4-ft", "not 'rtn'"), ("w2-e8-ft-ft", "unknown recipe")]:
        with pytest.raises(LowbitError, match=why):
            parse_spec(bad)


@pytest.mark.parametrize("name", ["ft", "g32", "E8", "8e"])
def test_register_method_refuses_names_the_grammar_cannot_read(name):
    from lowbit_compile.recipe import register_method

    with pytest.raises(LowbitError, match="method name"):
        register_method(name, "", rotate=False, needs_calibration=False)
