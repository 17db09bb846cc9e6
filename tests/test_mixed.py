"""Mixed precision end to end on a tiny Llama: measure (non-sequential) → solve → lb.quantize with the plan.
A smaller Llama than tinymodels' and data-free RTN candidates keep the test fast; their proxy losses are
computed from the same Hessians."""

import json

import pytest
import torch

import lowbit_compile as lb
from lowbit_compile.errors import LowbitError
from lowbit_compile.mixed import build_units, measure, plan_from, plan_recipe
from lowbit_compile.pipeline import quantize_mixed
from lowbit_compile.recipe import parse_spec

CANDIDATES = ("w2-rtn", "w3-rtn", "w4-rtn")
PINS = {"model.layers.0.mlp.down_proj": "w4-rtn", "re:.*layers\\.1\\.self_attn\\.o_proj": None}


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(2)]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    return model, measure(model, _batches(), CANDIDATES, PINS, progress=False)


def test_measurement_covers_every_linear_but_the_float_head(setup):
    model, meas = setup
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert list(meas.linears) == [f for f in linears if f != "lm_head"] and "lm_head" in meas.excluded
    q = meas.linears["model.layers.1.self_attn.q_proj"]
    assert q.block == "model.layers.1" and q.group == "model.layers.1.self_attn.q_proj"
    assert meas.linears["model.layers.1.self_attn.v_proj"].group == q.group  # q/k/v share an input
    assert set(q.results) == set(CANDIDATES) and q.sensitivity > 0
    losses = [q.results[c].proxy_loss for c in CANDIDATES]
    assert losses == sorted(losses, reverse=True)
    assert set(meas.lim) == set(meas.zd) == {"model.layers.0", "model.layers.1"}
    assert meas.calibration["sequential"] is False


@pytest.mark.parametrize("unit", ["linear", "group", "block"])
def test_the_plan_meets_the_budget_and_keeps_units_together(setup, unit):
    _, meas = setup
    plan, report = plan_from(meas, 5.0, unit)  # the float pin (32 bits) is inside the budget
    assert report.bits <= report.budget and report.bits_per_weight <= 5.0 and report.exact
    assert plan["lm_head"] is None and plan["model.layers.1.self_attn.o_proj"] is None
    assert plan["model.layers.0.mlp.down_proj"] == parse_spec("w4-rtn")
    rows = {r["fqn"]: r for r in report.rows}
    assert rows["model.layers.1.self_attn.o_proj"]["bits_per_weight"] == 32.0
    assert sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in report.rows) == pytest.approx(report.bits)
    free = [f for f, r in rows.items() if not r["pinned"]]
    if unit == "group":
        assert len({rows[f"model.layers.0.self_attn.{p}_proj"]["format"] for p in "qkv"}) == 1
    if unit == "block":
        for b in ("model.layers.0", "model.layers.1"):
            assert len({rows[f]["format"] for f in free if f.startswith(b + ".")}) == 1
    # one more step of budget never buys a worse plan
    _, more = plan_from(meas, 5.5, unit)
    assert more.predicted_loss <= report.predicted_loss


def test_losses_and_units_are_checked(setup):
    _, meas = setup
    with pytest.raises(LowbitError, match="unit must be one of"):
        build_units(meas, "layer")
    with pytest.raises(LowbitError, match="loss must be one of"):
        plan_from(meas, 5.0, "linear", "mse")
    with pytest.raises(LowbitError, match=r"below what these options can reach.*4\.\d+ bits/weight"):
        plan_from(meas, 2.5)  # the layer pinned to float alone makes 2.5 unreachable
    for loss in ("proxy", "relative"):
        assert plan_from(meas, 5.0, "linear", loss)[1].bits <= plan_from(meas, 5.0)[1].budget


def test_the_plan_recipe_applies_the_plan_by_exact_name(setup):
    _, meas = setup
    plan, _ = plan_from(meas, 5.0)
    recipe = plan_recipe(plan, 5.0, seed=3)
    assert recipe.name == "5.0bpw" and recipe.seed == 3
    assert all(recipe.spec_for(f)[0] == spec for f, spec in plan.items())


def test_quantize_mixed_stores_the_plan_and_reaches_the_planned_bits(setup, tmp_path):
    model, meas = setup
    ck = quantize_mixed(model, _batches(), 5.0, CANDIDATES, "group", PINS, measurements=meas,
                        report_path=str(tmp_path / "plan.md"), progress=False)
    mixed = ck.meta["mixed"]
    planned = {r["fqn"] for r in mixed["rows"]}
    stored = sum(ck.records[f].bits_per_weight() * ck.records[f].in_features * ck.records[f].out_features
                 for f in planned if f in ck.records) + 32 * 64 * 64  # the layer pinned to float
    assert round(stored) == mixed["bits"] and mixed["bits_per_weight"] <= 5.0
    assert {r["fqn"]: r["format"] for r in mixed["rows"]}["model.layers.0.mlp.down_proj"] == "w4-rtn"
    assert "model.layers.1.self_attn.o_proj" not in ck.records
    json.dumps(mixed)  # stored in the checkpoint's JSON as is
    ck.save(tmp_path / "ck")
    assert lb.Checkpoint.load(tmp_path / "ck").meta["mixed"]["bits"] == mixed["bits"]
    table = (tmp_path / "plan.md").read_text()
    assert "model.layers.0.mlp.down_proj" in table and "w4-rtn (pinned)" in table and "optimal" in table
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bpw_recipe_through_lb_quantize_plans_then_quantizes():
    model = tiny_llama(layers=1)
    recipe = lb.Recipe.mixed(3.0, candidates=("w2-rtn", "w4-rtn"), unit="group", seed=1)
    ck = lb.quantize(model, recipe, _batches(), overrides={"re:.*down_proj": "w4-rtn"}, progress=False)
    mixed = ck.meta["mixed"]
    assert mixed["target_bpw"] == 3.0 and mixed["bits_per_weight"] <= 3.0 and ck.seed == 1
    formats = {r["fqn"]: r["format"] for r in mixed["rows"]}
    assert formats["model.layers.0.mlp.down_proj"] == "w4-rtn" and set(formats.values()) == {"w2-rtn", "w4-rtn"}
    assert {f: ck.records[f].bits for f in formats} == {f: int(v[1]) for f, v in formats.items()}
    with pytest.raises(Exception, match="mixed-precision budget.*pass options=\\{'checkpoint': ckpt\\}"):
        torch.compile(model, backend="lowbit", options={"recipe": "2.5bpw"})(torch.zeros(1, 4, dtype=torch.long))


def test_bad_pins_and_missing_calibration_are_clear_errors():
    model = tiny_llama(layers=1)
    with pytest.raises(LowbitError, match="pin 're:.*q_proj': unknown recipe 'w5'"):
        measure(model, _batches(), CANDIDATES, {"re:.*q_proj": "w5"}, progress=False)
    with pytest.raises(LowbitError, match="calibration data"):
        measure(model, None, CANDIDATES, progress=False)
