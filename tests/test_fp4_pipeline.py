"""FP4 end to end: lb.quantize with "fp4" / "w4a16-fp4", save/load, torch.compile with the checkpoint or
calibrating on the first call, and the issue's bad inputs (all-zero activations, Inf, a norm without affine
weight). The search runs on a short clipping grid with one round here; the full search is the same code."""

import pytest
import torch
from tinymodels import minilm, tiny_llama

import lowbit_compile as lb
from lowbit_compile.backend import CACHE
from lowbit_compile.checkpoint import FP4QuantizedLinear
from lowbit_compile.errors import LowbitError
from lowbit_compile.quantize import fp4 as q

pytestmark = pytest.mark.usefixtures("one_thread")

# Bit-exact comparisons with the swapped modules run the reference ops (kernels="reference"); the CPU fast paths are
# compared with their own tolerance in tests/kernels/test_cpu_fp4.py.
REF = {"kernels": "reference"}
EAGER_REF = {"compiler": "eager", **REF}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, fresh_compiler):
    monkeypatch.setattr(q, "CLIP_GRID", (0.6, 0.8, 1.0))
    monkeypatch.setattr(q, "SEARCH_ROUNDS", 1)


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 320, (2, 16), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def llama_fp4():
    torch.manual_seed(0)
    q_grid, q_rounds = q.CLIP_GRID, q.SEARCH_ROUNDS
    q.CLIP_GRID, q.SEARCH_ROUNDS = (0.6, 0.8, 1.0), 1
    try:
        model = tiny_llama()
        return model, lb.quantize(model, "fp4", _batches(), progress=False)
    finally:
        q.CLIP_GRID, q.SEARCH_ROUNDS = q_grid, q_rounds


def test_fp4_quantize_records_share_exponents_per_input(llama_fp4):
    model, ck = llama_fp4
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(ck.records) == linears - {"lm_head"}
    assert all(isinstance(r, FP4QuantizedLinear) and r.a_format is not None for r in ck.records.values())
    assert all(r.proxy_loss <= r.baseline_loss for r in ck.records.values())
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = [ck.records[p + f"self_attn.{n}_proj"].act_exponents for n in "qkv"]
        assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])  # one norm, one k
        assert torch.equal(ck.records[p + "mlp.gate_proj"].act_exponents, ck.records[p + "mlp.up_proj"].act_exponents)
    assert "fp4 w4a4 searched + act. exponents" in ck.table()
    assert ck.bits_per_weight() < 32


@pytest.mark.drift
def test_fp4_checkpoint_compiles_to_the_same_outputs_as_swapped_modules(llama_fp4, tmp_path):
    model, ck = llama_fp4
    ck.save(tmp_path / "ck")
    loaded = lb.Checkpoint.load(tmp_path / "ck")
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        swapped = lb.swap_linears(model, loaded.records)(ids).logits
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": str(tmp_path / "ck"),
                                                                    **EAGER_REF})(ids).logits
        float_out = model(ids).logits
    assert torch.equal(compiled, swapped)  # folding (in the compiled graph) changes nothing
    report = lb.last_report()
    assert report.rewritten == 14 and CACHE.quantized == 0
    assert all(r.spec.startswith("fp4 w:") for r in report.quantized)
    rel = (compiled - float_out).norm() / float_out.norm()
    assert 1e-3 < rel < 0.5, f"W4A4 relative logit error {rel:.3f}"


@pytest.mark.slow
def test_fp4_checkpoint_through_inductor():
    """Inductor compiles the folded graph (fp4_linear as an extern call, folded constants as buffers); its
    float order may differ from eager, so the comparison has a float tolerance, not bit equality."""
    model = tiny_llama(layers=1)
    ck = lb.quantize(model, "fp4", _batches(1), progress=False)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        swapped = lb.swap_linears(model, ck.records)(ids).logits
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": ck, **REF})(ids).logits
    assert lb.last_report().rewritten == 7
    assert any("folded into" in n for n in lb.last_report().notes)
    # activation rounding can flip on a last-bit difference, so compare in aggregate
    assert (compiled - swapped).norm() / swapped.norm() < 1e-3


def test_w4a16_is_closer_to_float_than_w4a4(llama_fp4):
    model, ck4 = llama_fp4
    ck16 = lb.quantize(model, "w4a16-fp4", _batches(), progress=False)
    assert all(r.a_format is None and r.act_exponents is None for r in ck16.records.values())
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        err = {name: (lb.swap_linears(model, ck.records)(ids).logits - ref).norm() / ref.norm()
               for name, ck in (("a4", ck4), ("a16", ck16))}
    assert err["a16"] < err["a4"]


def test_w4a16_fp4_on_real_minilm_compiles_like_the_swapped_model():
    model, tok = minilm()
    recipe = lb.Recipe.parse("w4a16-fp4", {"re:encoder\\.layer\\.[2-5]\\..*": None})
    ck = lb.quantize(model, recipe, ["The first calibration sentence.", "Another line of English text."],
                     tokenizer=tok, progress=False)
    assert len(ck.records) == 2 * 6 + 1  # two layers' linears + the pooler
    enc = dict(tok(["hello world", "quantized sentence embeddings"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        swapped = lb.swap_linears(model, ck.records)(**enc).last_hidden_state
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": ck, **EAGER_REF})(
            **enc).last_hidden_state
        ref = model(**enc).last_hidden_state
    assert torch.equal(compiled, swapped)
    mask = enc["attention_mask"].unsqueeze(-1)
    cos = torch.nn.functional.cosine_similarity((compiled * mask).sum(1), (ref * mask).sum(1)).min()
    assert cos > 0.9


def test_fp4_recipe_without_checkpoint_calibrates_on_the_first_call(caplog):
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad(), caplog.at_level("WARNING", logger="lowbit_compile"):
        compiled = torch.compile(model, backend="lowbit", options={"recipe": "fp4", **EAGER_REF})
        y = compiled(ids).logits
        compiled(torch.randint(0, 320, (1, 5)))  # a recompile: no second calibration or search
    assert sum("calibrating on the first call's inputs (32 tokens)" in r.message for r in caplog.records) == 1
    first = lb.REPORTS[0]
    assert len(first.quantized) == 7 and all(r.cached for r in lb.last_report().quantized)
    recs = first.records
    assert torch.equal(recs["model.layers.0.self_attn.q_proj"].act_exponents,
                       recs["model.layers.0.self_attn.v_proj"].act_exponents)
    assert any("folded into a folded copy" in n for n in first.notes)
    with torch.no_grad():
        assert torch.equal(y, lb.swap_linears(model, recs)(ids).logits)


def test_fp4_rot_shares_one_rotation_per_input_and_compiles_like_the_swapped_model():
    model = tiny_llama(layers=1)
    ck = lb.quantize(model, "fp4-rot", _batches(1), progress=False)
    recs = ck.records
    seeds = {f: r.seed for f, r in recs.items()}
    assert seeds["model.layers.0.self_attn.q_proj"] == seeds["model.layers.0.self_attn.v_proj"]
    assert seeds["model.layers.0.mlp.gate_proj"] == seeds["model.layers.0.mlp.up_proj"]
    assert len(set(seeds.values())) == 4  # q/k/v, o, gate/up, down
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        swapped = lb.swap_linears(model, recs)(ids).logits
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": ck, **EAGER_REF})(ids).logits
    assert torch.equal(compiled, swapped)
    assert lb.last_report().rewritten == 7


# ---------------------------------------------------------------- bad input


class NormMLP(torch.nn.Module):
    def __init__(self, affine=True, zero=False):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(24, elementwise_affine=affine)
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 24)
        self.zero = zero

    def forward(self, x):
        h = torch.relu(self.fc1(self.norm(x)))
        return self.fc2(h * 0 if self.zero else h)


def test_all_zero_activations_quantize_with_a_note():
    model = NormMLP(zero=True).eval()
    ck = lb.quantize(model, "fp4", [torch.randn(4, 8, 24)], progress=False)
    note = next(p["notes"] for p in ck.plan if p["fqn"] == "fc2")
    assert any("all zero" in n for n in note)
    assert ck.records["fc2"].act_scale is not None and torch.isfinite(ck.records["fc2"].act_scale).all()
    with torch.no_grad():
        y = lb.swap_linears(model, ck.records)(torch.randn(2, 24))
    assert torch.isfinite(y).all()


def test_an_inf_channel_in_calibration_is_an_error_naming_layer_and_channel():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(3, 8)
    x[1, 5] = float("inf")
    with pytest.raises(LowbitError, match=r"layer 0: calibration activations contain NaN or Inf \(input channel 5 "
                                          r"has Inf"):
        lb.quantize(model, "fp4", [x], progress=False)


def test_norm_without_affine_weight_keeps_a_runtime_shift_and_the_report_says_so():
    model = NormMLP(affine=False).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 24, generator=g)
    x[..., 3] *= 30  # an outlier channel through the norm: fc1 gets exponents
    with torch.no_grad():
        y = torch.compile(model, backend="lowbit", options={"recipe": "fp4", **EAGER_REF})(x)
        report = lb.last_report()
        assert report.records["fc1"].act_exponents is not None
        assert torch.equal(y, lb.swap_linears(model, report.records)(x))
    assert any("layer fc1: activation exponents kept as a run-time shift" in n and "no affine weight" in n
               for n in report.notes)


def test_fp4_calibration_skips_the_hessian_and_writes_the_same_checkpoint(monkeypatch):
    """FP4 layers need samples and maxima, not Σ x xᵀ: calibration skips the float64 products in every block none
    of whose linears needs them (a block with a QuIP layer collects them for all its inputs), and the checkpoint is
    the same either way."""
    from lowbit_compile import calibrate
    from lowbit_compile.recipe import Recipe

    seen = []
    real_init = calibrate.HessianAccumulator.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.name, self.with_hessian))

    monkeypatch.setattr(calibrate.HessianAccumulator, "__init__", spy)
    torch.manual_seed(0)
    model = tiny_llama()
    skipped = lb.quantize(model, "fp4", _batches(), progress=False)
    assert seen and not any(h for _, h in seen)
    seen.clear()
    mixed = lb.quantize(model, "fp4", _batches(), overrides={"model.layers.0.mlp.down_proj": "w2-quip"},
                        progress=False)
    assert {n for n, h in seen if h} == {n for n, _ in seen if n.startswith("model.layers.0.")}
    assert {n for n, h in seen if not h} == {n for n, _ in seen if not n.startswith("model.layers.0.")}
    assert ("lm_head", False) in seen  # kept in float: observed, no Hessian
    assert mixed.records["model.layers.0.mlp.down_proj"].bits == 2
    seen.clear()
    monkeypatch.setattr(Recipe, "needs_hessian", lambda self, fqn: True)
    collected = lb.quantize(model, "fp4", _batches(), progress=False)
    assert seen and all(h for _, h in seen)
    assert skipped.records.keys() == collected.records.keys()
    for f, rec in skipped.records.items():
        other = collected.records[f]
        assert torch.equal(rec.qweight, other.qweight) and torch.equal(rec.w_scales, other.w_scales), f
        assert torch.equal(rec.act_scale, other.act_scale) and rec.a_format == other.a_format, f


@pytest.mark.parametrize("recipe", ["fp4", "fp4-rot"])
def test_calibration_module_computes_what_the_run_time_module_computes_bit_for_bit(recipe, monkeypatch):
    """lb.quantize's sequential passes run nn.CalibrationFP4Linear (weight decoded once, native activation rounding)
    in place of LowbitFP4Linear (the reference op): the same bits, on both rounding paths, 2-D and 3-D inputs."""
    from lowbit_compile.nn import CalibrationFP4Linear, LowbitFP4Linear

    torch.manual_seed(0)
    model = tiny_llama()
    ckpt = lb.quantize(model, recipe, _batches(), progress=False)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for fqn, rec in ckpt.records.items():
        lin = model.get_submodule(fqn)
        bias = torch.randn(rec.out_features, generator=g)
        reference, calibration = LowbitFP4Linear(rec, bias), CalibrationFP4Linear(rec, bias)
        for x in (torch.randn(5, rec.in_features, generator=g) * 4, torch.randn(2, 3, rec.in_features, generator=g)):
            for native in ("1", "0"):
                monkeypatch.setenv("LOWBIT_NATIVE_FP4", native)
                want, got = reference(x), calibration(x)
                assert torch.equal(want.view(torch.int32), got.view(torch.int32)), (fqn, native)
        assert lin.in_features == rec.in_features
        checked += 1
    assert checked == len(ckpt.records) > 0
