"""fold_act_scales: FP4 activation exponents folded into norms and FP4 row scales; folded == unfolded bit for
bit in float32, on hand-built graphs and on real HF graphs (Dynamo and torch.export)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tinymodels import minilm, tiny_llama
from torch.fx.passes.shape_prop import ShapeProp

import lowbit_compile as lb
from lowbit_compile.kernels.specs import FP4_LINEAR
from lowbit_compile.passes import FindLinears, FoldActScales, RewriteLinears
from lowbit_compile.quantize import fp4 as q
from lowbit_compile.quantize.layer import quantize_fp4_group
from lowbit_compile.recipe import parse_spec

N = 48

# Bit-exact comparisons with the swapped modules run the reference ops (kernels="reference"); the CPU fast paths are
# compared with their own tolerance in tests/kernels/test_cpu_fp4.py.
REF = {"kernels": "reference"}
EAGER_REF = {"compiler": "eager", **REF}


@pytest.fixture(autouse=True)
def _small_search(monkeypatch):
    monkeypatch.setattr(q, "CLIP_GRID", (0.6, 0.8, 1.0))
    monkeypatch.setattr(q, "SEARCH_ROUNDS", 1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    lb.reset()
    yield
    torch.set_num_threads(n)
    torch._dynamo.reset()


def _shifts(gm):
    """{layer: whether its fp4_linear still has a run-time shift}"""
    return {n.meta.get("lowbit_quantized", n.name): FP4_LINEAR.args_of(n)["act_shift"] is not None
            for n in gm.graph.nodes if FP4_LINEAR.is_call(n)}


class GatedBlock(torch.nn.Module):
    """Pre-norm block: a norm feeding q/k and gate/up, a gated MLP, optionally a post-norm residual use."""

    def __init__(self, affine=True, norm_in_residual=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.rand(N, generator=g) + 0.5) if affine else None
        self.bias = torch.nn.Parameter(torch.randn(N, generator=g) * 0.1) if affine else None
        self.q = torch.nn.Linear(N, 32)
        self.k = torch.nn.Linear(N, 32)
        self.gate = torch.nn.Linear(N, 64, bias=False)
        self.up = torch.nn.Linear(N, 64)
        self.down = torch.nn.Linear(64, N)
        self.norm_in_residual = norm_in_residual

    def forward(self, x):
        h = F.layer_norm(x, (N,), self.weight, self.bias)
        y = self.down(F.silu(self.gate(h)) * self.up(h))
        r = h if self.norm_in_residual else x
        return r + y, self.q(h) * self.k(h)


def _inputs(seed=0, tokens=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, N, generator=g)
    x[:, [2, 30]] *= 20  # outlier channels, so the exponents are not all zero
    return x


def _records(model, x, shared=True):
    """Records from the block's real layer inputs; q/k and gate/up share exponents unless shared=False."""
    with torch.no_grad():
        h = F.layer_norm(x, (N,), model.weight, model.bias)
        mid = F.silu(model.gate(h)) * model.up(h)
    spec = parse_spec("fp4")
    groups = [({"q": (model.q.weight, spec), "k": (model.k.weight, spec)}, h),
              ({"gate": (model.gate.weight, spec), "up": (model.up.weight, spec)}, h),
              ({"down": (model.down.weight, spec)}, mid)]
    if not shared:  # q and k with different exponents
        other = h.clone()
        other[:, 7] *= 40  # another outlier channel: other exponents
        groups[0] = ({"q": (model.q.weight, spec)}, h), ({"k": (model.k.weight, spec)}, other)
        groups = [groups[0][0], groups[0][1], *groups[1:]]
    recs = {}
    for layers, sample in groups:
        recs.update(quantize_fp4_group(layers, sample))
    return recs


def _rewritten(model, recs, x):
    gm = torch.fx.symbolic_trace(model)
    FindLinears()(gm)
    RewriteLinears(recs)(gm)
    ShapeProp(gm).propagate(x)  # a plain FX trace has no shapes; the row fold follows channels by shape
    return gm


def _fold_and_compare(model, recs, x):
    gm = _rewritten(model, recs, x)
    unfolded = copy.deepcopy(gm)
    fold = FoldActScales()
    result = fold(gm)
    with torch.no_grad():
        for a, b in zip(gm(x), unfolded(x)):
            assert torch.equal(a, b)
    return gm, fold, result


def test_norm_and_row_folds_on_a_gated_block_are_exact():
    model = GatedBlock()
    x = _inputs()
    recs = _records(model, x)
    assert all(r.act_exponents is not None for r in recs.values())
    weight_before = model.weight.detach().clone()
    gm, fold, result = _fold_and_compare(model, recs, _inputs(seed=1))
    assert result.modified
    assert _shifts(gm) == {"q": False, "k": False, "gate": False, "up": False, "down": False}
    assert fold.folded["down"] == "the output rows of up"
    norms = [n for n in gm.graph.nodes if n.target is F.layer_norm]
    distinct_k = {tuple(recs[f].act_exponents.tolist()) for f in ("q", "k", "gate", "up")}
    assert len(norms) == len(distinct_k)  # one folded copy per exponent vector; the original is gone
    assert torch.equal(model.weight, weight_before)  # the model's parameter itself is never modified
    assert FoldActScales()(gm).modified is False  # nothing left to fold: honest `modified`


def test_a_norm_that_also_feeds_the_residual_is_duplicated():
    model = GatedBlock(norm_in_residual=True)
    recs = _records(model, _inputs())
    gm, fold, _ = _fold_and_compare(model, recs, _inputs(seed=2))
    norms = [n for n in gm.graph.nodes if n.target is F.layer_norm]
    distinct_k = {tuple(recs[f].act_exponents.tolist()) for f in ("q", "k", "gate", "up")}
    assert len(norms) == 1 + len(distinct_k)  # the original keeps serving the residual
    assert not any(_shifts(gm).values())


def test_consumers_with_different_exponents_get_their_own_copies():
    model = GatedBlock()
    recs = _records(model, _inputs(), shared=False)
    assert not torch.equal(recs["q"].act_exponents, recs["k"].act_exponents)
    gm, _, _ = _fold_and_compare(model, recs, _inputs(seed=3))
    distinct_k = {tuple(recs[f].act_exponents.tolist()) for f in ("q", "k", "gate", "up")}
    assert len(distinct_k) >= 2
    assert len([n for n in gm.graph.nodes if n.target is F.layer_norm]) == len(distinct_k)
    assert not any(_shifts(gm).values())


def test_norm_without_affine_weight_keeps_the_shift_and_says_so():
    model = GatedBlock(affine=False)
    recs = _records(model, _inputs())
    gm, fold, _ = _fold_and_compare(model, recs, _inputs(seed=4))
    shifts = _shifts(gm)
    assert shifts["q"] and shifts["gate"] and not shifts["down"]  # down still folds into up's rows
    assert any("layer q: activation exponents kept as a run-time shift" in n and "no affine weight" in n
               for n in fold.notes)


def test_overflowing_fold_is_refused_and_reported():
    model = GatedBlock()
    recs = _records(model, _inputs())
    k = recs["q"].act_exponents
    c = int(k.argmax())
    with torch.no_grad():
        model.weight[c] = 3e38  # times 2**k overflows float32
    gm, fold, _ = _fold_and_compare(model, recs, _inputs(seed=5))
    assert _shifts(gm)["q"] and "overflows torch.float32" in fold.kept["q"]


def test_a_producer_whose_output_is_also_returned_keeps_the_shift():
    class Leaky(GatedBlock):
        def forward(self, x):
            h = F.layer_norm(x, (N,), self.weight, self.bias)
            u = self.up(h)
            return self.down(F.silu(self.gate(h)) * u), u

    model = Leaky()
    recs = _records(model, _inputs())
    recs = {f: r for f, r in recs.items() if f in ("gate", "up", "down")}
    gm, fold, _ = _fold_and_compare(model, recs, _inputs(seed=6))
    assert _shifts(gm)["down"] and "also feeds" in fold.kept["down"]


# ---------------------------------------------------------------- real HF graphs


def test_folded_llama_dynamo_graph_equals_unfolded_modules_bit_for_bit():
    model = tiny_llama(layers=1)
    model.config.use_cache = False  # else v_proj's output is also returned (the cache): no row fold
    g = torch.Generator().manual_seed(0)
    ck = lb.quantize(model, "fp4", [torch.randint(0, 320, (2, 16), generator=g)], progress=False)
    ids = torch.randint(0, 320, (2, 7), generator=g)
    norm_weight = model.model.layers[0].input_layernorm.weight.detach().clone()
    with torch.no_grad():
        unfolded = lb.swap_linears(model, ck.records)(ids).logits  # run-time shifts in every layer
        folded = torch.compile(model, backend="lowbit", options={"checkpoint": ck, **EAGER_REF})(ids).logits
    assert torch.equal(folded, unfolded)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_weight)
    notes = "\n".join(lb.last_report().notes)
    for layer in ("q_proj", "k_proj", "v_proj"):
        assert f"self_attn.{layer}: activation exponents folded into a folded copy" in notes
    assert "mlp.down_proj: activation exponents folded into the output rows of model.layers.0.mlp.up_proj" in notes
    # GQA: 4 query heads read 2 value heads; per-head exponents of o_proj differ, so the shift stays
    assert "o_proj: activation exponents kept as a run-time shift (channels made from the same row" in notes


def test_folded_minilm_export_graph_equals_unfolded_bit_for_bit():
    model, tok = minilm()
    from lowbit_compile.pipeline import tokenize

    recipe = lb.Recipe.parse("fp4", {"re:encoder\\.layer\\.[1-5]\\..*": None, "pooler.dense": None})
    ck = lb.quantize(model, recipe, tokenize(tok, ["A short calibration sentence for the test."], 1, 16),
                     progress=False)
    swapped = lb.swap_linears(model, ck.records)
    enc = dict(tok(["hello world", "a second sentence"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        unfolded = swapped(**enc).last_hidden_state
        gm = torch.export.export(swapped, (), enc, strict=False).module()
        fold = FoldActScales()
        assert fold(gm).modified
        folded = gm(**enc).last_hidden_state
    assert torch.equal(folded, unfolded)
    assert set(fold.folded) == {f"encoder.layer.0.{n}" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense")}
    assert fold.folded["encoder.layer.0.attention.output.dense"] == (
        "the output rows of encoder.layer.0.attention.self.value")
    assert "gelu" in fold.kept["encoder.layer.0.output.dense"]
