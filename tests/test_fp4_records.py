"""FP4 in the product's data: recipe strings, FP4QuantizedLinear records (save/load bit for bit, bits per
weight), and the calibration token sample the FP4 search runs on."""

import json

import pytest
import torch

import lowbit_compile as lb
from lowbit_compile.calibrate import HessianAccumulator
from lowbit_compile.checkpoint import FORMAT_VERSION, FP4QuantizedLinear, QuantizedLinear
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize import fp4 as q
from lowbit_compile.quantize.layer import quantize_fp4_group, quantize_weight
from lowbit_compile.recipe import LayerSpec, Recipe, parse_spec, valid_recipe_names

GRID = (0.5, 0.7, 0.85, 1.0)


@pytest.fixture(autouse=True)
def _small_search(monkeypatch):
    """A short clipping grid, one round, one thread: these layers are tiny."""
    monkeypatch.setattr(q, "CLIP_GRID", GRID)
    monkeypatch.setattr(q, "SEARCH_ROUNDS", 1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- recipes


def test_fp4_recipe_names_parse():
    w4a4, w4a16 = parse_spec("fp4"), parse_spec("W4A16-FP4")
    assert (w4a4.method, w4a4.act_quant, w4a4.fp4_search, w4a4.act_exponents) == ("fp4", True, True, True)
    assert (w4a16.method, w4a16.act_quant) == ("fp4", False)
    assert w4a4.needs_calibration and w4a16.needs_calibration
    assert Recipe.parse("fp4").needs_calibration
    assert w4a4.describe() == "fp4 w4a4 searched + act. exponents" and w4a16.describe() == "fp4 w4a16 searched"
    assert LayerSpec(method="fp4", rotate=False, fp4_search=False).describe() == "fp4 w4a4 max-scaled e2m1"
    rot = parse_spec("fp4-rot")
    assert (rot.rotate, rot.act_quant, rot.act_exponents) == (True, True, False)
    assert rot.describe() == "fp4 w4a4 searched + rotation"
    assert {"fp4", "w4a16-fp4", "fp4-rot"} <= set(valid_recipe_names())
    mixed = Recipe.parse("w4", {"re:.*mlp\\..*": "fp4"})
    assert mixed.spec_for("model.layers.0.mlp.up_proj")[0].method == "fp4"
    assert mixed.spec_for("model.layers.0.self_attn.q_proj")[0].method == "rtn"


def test_unknown_recipe_lists_fp4_names_too():
    with pytest.raises(LowbitError, match=r"valid recipes: w2, .*w4-quip.*, fp4, w4a16-fp4"):
        parse_spec("fp8")


def test_fp4_spec_rejects_integer_only_options():
    with pytest.raises(LowbitError, match="FP4 layers are 4-bit with one scale per output row; got bits=3"):
        LayerSpec(bits=3, method="fp4", rotate=False)
    with pytest.raises(LowbitError, match="group_size=128"):
        LayerSpec(bits=4, method="fp4", rotate=False, group_size=128)


# ---------------------------------------------------------------- records


def _layer(seed=0, tokens=96, n=40, m=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, [3, 17]] *= 25
    return x, torch.randn(m, n, generator=g) / n**0.5


def test_fp4_record_from_quantize_weight_matches_the_op_and_counts_its_bits():
    x, w = _layer()
    rec = quantize_weight("blk.fc", w, parse_spec("fp4"), sample=x)
    assert isinstance(rec, FP4QuantizedLinear) and rec.method == "search"
    assert rec.act_exponents is not None and rec.act_exponents.dtype == torch.uint8
    assert rec.proxy_loss <= rec.baseline_loss
    # the effective weight maps the shifted codes back to x's coordinates
    assert torch.equal(rec.dequantized_weight(), rec.shifted_weight() * 2.0 ** rec.act_exponents.float())
    b = torch.randn(24)
    y = torch.ops.lowbit.fp4_linear(x, rec.qweight, rec.w_scales, rec.act_exponents, rec.act_scale,
                                    rec.w_format, rec.a_format, b, 40)
    assert torch.equal(y, rec.forward_reference(x, b))
    # 4-bit codes + fp16 row scale + fp16 activation scale + one uint8 exponent per input channel
    assert rec.bits_per_weight() == pytest.approx((24 * 20 * 8 + 24 * 16 + 16 + 40 * 8) / (24 * 40))
    w16 = quantize_weight("blk.fc", w, parse_spec("w4a16-fp4"), sample=x)
    assert w16.a_format is None and w16.act_scale is None and w16.act_exponents is None
    assert w16.bits_per_weight() == pytest.approx(4 + 16 / 40)


def test_rotated_record_applies_the_rotation_before_the_op():
    x, w = _layer(seed=5, n=40)
    rec = quantize_weight("blk.fc", w, parse_spec("fp4-rot"), sample=x)
    assert rec.act_exponents is None and rec.bits_per_weight() == pytest.approx(
        (24 * 20 * 8 + 24 * 16 + 16 + 40) / (24 * 40))  # one bit per rotation sign
    module = lb.swap_linears(torch.nn.Sequential(torch.nn.Linear(40, 24)), {"0": rec})
    with torch.no_grad():
        assert torch.equal(module(x), rec.forward_reference(x, module[0].bias))
    # the rotation flattens the outlier channels: a better layer error than without it, no exponents needed
    plain = quantize_weight("blk.fc", w, lb.LayerSpec(method="fp4", rotate=False, act_exponents=False), sample=x)
    assert rec.proxy_loss < plain.proxy_loss


def test_fp4_needs_a_sample():
    _, w = _layer()
    with pytest.raises(LowbitError, match="blk.fc: FP4 needs calibration data"):
        quantize_weight("blk.fc", w, parse_spec("fp4"))


def test_a_group_shares_one_exponent_vector():
    x, w1 = _layer(seed=1)
    _, w2 = _layer(seed=2)
    spec = parse_spec("fp4")
    recs = quantize_fp4_group({"a": (w1, spec), "b": (w2, spec)}, x)
    assert torch.equal(recs["a"].act_exponents, recs["b"].act_exponents)
    assert recs["a"].a_format == recs["b"].a_format
    assert int(recs["a"].act_exponents.max()) > 0  # the outlier channels are shifted


def test_checkpoint_round_trip_is_bit_exact_for_fp4_and_integer_records(tmp_path):
    x, w = _layer(seed=3, n=41)  # odd in_features: the last byte holds one code
    recs = {
        "l.fp4": quantize_weight("l.fp4", w, parse_spec("fp4"), sample=x),
        "l.a16": quantize_weight("l.a16", w, parse_spec("w4a16-fp4"), sample=x),
        "l.int": quantize_weight("l.int", w, parse_spec("w4"), seed=0),
        "l.rot": quantize_weight("l.rot", w[:, :40], parse_spec("fp4-rot"), seed=3, sample=x[:, :40]),
    }
    assert recs["l.rot"].su is not None and recs["l.rot"].seed is not None
    recs["l.fp4"].notes = ["a note"]
    plan = [{"fqn": f, "shape": [r.out_features, r.in_features], "spec": "x", "reason": ""} for f, r in recs.items()]
    ck = lb.Checkpoint(records=recs, recipe="fp4", plan=plan)
    ck.save(tmp_path / "ck")
    back = lb.Checkpoint.load(tmp_path / "ck")
    assert isinstance(back.records["l.int"], QuantizedLinear)
    for f, r in recs.items():
        b = back.records[f]
        assert type(b) is type(r)
        for name in r.TENSORS:
            t, u = getattr(r, name), getattr(b, name)
            assert (t is None and u is None) or (torch.equal(t, u) and t.dtype == u.dtype)
        for name in r.FIELDS:
            assert getattr(b, name) == getattr(r, name)
        assert torch.equal(b.dequantized_weight(), r.dequantized_weight())
    meta = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["records"]["l.fp4"]["kind"] == "fp4" and meta["records"]["l.int"]["kind"] == "int"
    n = {f: r.in_features * r.out_features for f, r in recs.items()}
    assert back.bits_per_weight() == pytest.approx(sum(r.bits_per_weight() * n[f] for f, r in recs.items())
                                                   / sum(n.values()))


def test_version_1_checkpoints_load_and_unknown_kinds_are_refused(tmp_path):
    _, w = _layer(seed=4)
    rec = quantize_weight("l", w, parse_spec("w4"))
    path = lb.Checkpoint(records={"l": rec}, plan=[]).save(tmp_path / "ck")
    meta_path = tmp_path / "ck" / "lowbit.json"
    meta = json.loads(meta_path.read_text())
    del meta["records"]["l"]["kind"]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    assert isinstance(lb.Checkpoint.load(path).records["l"], QuantizedLinear)
    meta["records"]["l"]["kind"] = "fp8"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="layer l has record kind 'fp8'.*upgrade lowbit-compile"):
        lb.Checkpoint.load(path)


# ---------------------------------------------------------------- calibration sample


def test_sample_keeps_every_row_until_full_then_a_deterministic_bounded_reservoir():
    xs = [torch.randn(3, 7, 5), torch.randn(40, 5), torch.randn(100, 5)]
    acc = HessianAccumulator(5, "l", sample_size=32)
    acc.add(xs[0])
    assert torch.equal(acc.sample, xs[0].reshape(-1, 5))  # fewer tokens than the bound: all of them
    for x in xs[1:]:
        acc.add(x)
    assert acc.sample.shape == (32, 5) and acc.tokens == 161
    rows = torch.cat([x.reshape(-1, 5) for x in xs])
    assert all(bool((rows == r).all(1).any()) for r in acc.sample)  # real rows
    assert bool((acc.sample.unsqueeze(1) == rows[21:].unsqueeze(0)).all(-1).any())  # later tokens get in
    again = HessianAccumulator(5, "l", sample_size=32)
    for x in xs:
        again.add(x)
    assert torch.equal(again.sample, acc.sample)  # same data, same order: same sample


def test_accumulator_names_the_channel_with_inf():
    acc = HessianAccumulator(4, "blk.q_proj")
    x = torch.randn(6, 4)
    x[2, 1] = float("inf")
    with pytest.raises(LowbitError, match=r"blk\.q_proj: calibration activations contain NaN or Inf \(input "
                                          r"channel 1 has Inf"):
        acc.add(x)
