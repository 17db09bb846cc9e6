"""ONNX export: onnxruntime runs the exported low-bit models (MatMulNBits for 2/4/8 bits, integer-op unpack +
MatMul for 3 bits) and matches the PyTorch quantized model; the file keeps the low-bit size."""

import collections

import onnx
import pytest
import torch
from tinymodels import minilm, tiny_llama, with_weights

import lowbit_compile  # noqa: F401  (registers the ops)
from lowbit_compile.errors import LowbitError
from lowbit_compile.export import export
from lowbit_compile.export.onnx import choose_block, export_onnx, run_onnx
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _quantize(model, plan):
    """{fqn: record} for every nn.Linear whose name matches a plan key (substring), with that key's spec."""
    recs = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            spec = next((s for key, s in plan.items() if key in fqn), plan.get("*"))
            if spec:
                recs[fqn] = quantize_weight(fqn, mod.weight, parse_spec(spec), seed=0)
    return recs


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().detach())


def test_choose_block():
    assert choose_block(192, 0) == 64
    assert choose_block(384, 0) == 128
    assert choose_block(344, 0) == 32  # no block divides 344: pad to 352
    assert choose_block(256, 64) == 64
    with pytest.raises(LowbitError):
        choose_block(200, 40)


@pytest.mark.parametrize("spec", ["w2", "w3"])
def test_single_linear(tmp_path, spec):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(192, 160))
    recs = _quantize(lin, {"*": spec})
    res = export_onnx(lin, recs, (torch.randn(1, 3, 192),), tmp_path / "m.onnx")
    x = torch.randn(2, 7, 192)  # other batch and sequence: dynamic axes
    ref = with_weights(lin, recs)(x)
    got = run_onnx(tmp_path / "m.onnx", {onnx.load(str(tmp_path / "m.onnx")).graph.input[0].name: x})
    assert _rel_err(got, ref) < 1e-4
    route = "unpack+MatMul" if spec.startswith("w3") else "MatMulNBits"
    assert res["routes"] == {"0": route}
    assert ("MatMulNBits" in _ops(tmp_path / "m.onnx")) == (route == "MatMulNBits")


def test_standard_ops_variant(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(192, 64))
    recs = _quantize(lin, {"*": "w4"})
    res = export_onnx(lin, recs, (torch.randn(1, 3, 192),), tmp_path / "m.onnx", standard_ops=True)
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    assert "BitShift" not in _ops(tmp_path / "m.onnx")
    assert res["routes"] == {"0": "unpack+MatMul"}


def test_tiny_llama_mixed_plan(tmp_path):
    """2/3/4/8 bits, per-row and grouped scales, rotated and plain, K = 344 padded to MatMulNBits blocks."""
    model = tiny_llama(layers=1)
    model.config.use_cache = False
    plan = {"q_proj": "w2", "k_proj": "w3", "v_proj": "w4-rtn", "o_proj": "w8", "gate_proj": "w2-g64",
            "up_proj": "w3-rtn", "down_proj": "w4", "lm_head": "w4-g64"}
    recs = _quantize(model, plan)
    assert len(recs) == 8
    ids = torch.randint(0, 320, (1, 8))
    res = export(model, recs, (ids,), tmp_path / "llama.onnx")  # the dispatcher: .onnx → export_onnx
    assert res["max_abs_error"] is not None
    onnx.checker.check_model(str(tmp_path / "llama.onnx"))
    ops = _ops(tmp_path / "llama.onnx")
    assert ops["MatMulNBits"] == 6 and "BitShift" not in ops
    ids2 = torch.randint(0, 320, (2, 5))
    name = onnx.load(str(tmp_path / "llama.onnx")).graph.input[0].name
    got = run_onnx(tmp_path / "llama.onnx", {name: ids2})
    with torch.no_grad():
        ref = with_weights(model, recs)(ids2).logits
    assert got.shape == ref.shape
    assert _rel_err(got, ref) < 1e-3


@pytest.mark.slow
def test_llama_4bit_size(tmp_path):
    """A linear-dominated Llama (hidden 768 = 12·64, MLP 1536) at 4 bits: bytes per quantized weight.

    Charged to the quantized weights: everything in the file except the non-linear tensors (embedding, norms),
    i.e. codes, scales, signs, Hadamard factors and the whole graph (attention included). On this size the
    graph is ~0.1 bits per weight; at hidden 384 it would be ~0.5, at real model sizes negligible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=768, intermediate_size=1536, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    recs = _quantize(model, {"*": "w4"})
    ids = torch.randint(0, 64, (1, 6))
    path = tmp_path / "llama4.onnx"
    res = export_onnx(model, recs, (ids,), path)
    m = onnx.load(str(path))
    quant_prefixes = tuple(f + "." for f in recs)
    other = sum(len(t.raw_data) for t in m.graph.initializer if not t.name.startswith(quant_prefixes))
    n_weights = sum(r.in_features * r.out_features for r in recs.values())
    file_bits = 8 * (res["bytes"] - other) / n_weights  # codes, scales, signs, factors AND the graph itself
    recipe_bits = sum(r.bits_per_weight() * r.in_features * r.out_features for r in recs.values()) / n_weights
    assert abs(file_bits - recipe_bits) < 0.3, (file_bits, recipe_bits)
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert res["bytes"] < 0.25 * float_bytes  # nothing was folded back to float
    assert _ops(path)["MatMulNBits"] == len(recs)


@pytest.mark.slow
def test_minilm_4bit(tmp_path):
    model, tok = minilm()
    recs = _quantize(model, {"*": "w4"})
    enc = tok(["a tiny sentence", "another, slightly longer sentence here"], return_tensors="pt", padding=True)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    res = export_onnx(model, recs, inputs, tmp_path / "minilm.onnx")
    assert len(res["routes"]) == len(recs) == 37 and set(res["routes"].values()) == {"MatMulNBits"}
    got = run_onnx(tmp_path / "minilm.onnx", inputs)
    with torch.no_grad():
        ref = with_weights(model, recs)(**inputs).last_hidden_state
    assert _rel_err(got, ref) < 1e-3


def test_verification_catches_mismatch(tmp_path, monkeypatch):
    from lowbit_compile.export import onnx as ox

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    recs = _quantize(lin, {"*": "w4-rtn"})
    recs["0"].scales[0, 0] *= 2  # the torch reference uses the record ...
    orig = ox.swap_for_onnx

    def broken(model, records, standard_ops=False):  # ... the exported graph a different scale
        m = orig(model, records, standard_ops)
        m[0].scales[0, 0] *= 3
        return m

    monkeypatch.setattr(ox, "swap_for_onnx", broken)
    with pytest.raises(LowbitError, match="verification failed"):
        export_onnx(lin, recs, (torch.randn(1, 2, 64),), tmp_path / "bad.onnx")


def test_fp4_w4a16(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    rec = quantize_weight("0", lin[0].weight, parse_spec("w4a16-fp4"), sample=torch.randn(16, 64))
    res = export_onnx(lin, {"0": rec}, (torch.randn(1, 2, 64),), tmp_path / "fp4.onnx")
    assert res["routes"] == {"0": "fp4 Gather table+MatMul"}
    ops = _ops(tmp_path / "fp4.onnx")
    assert "Gather" in ops and "BitShift" not in ops
    x = torch.randn(3, 4, 64)
    got = run_onnx(tmp_path / "fp4.onnx", {onnx.load(str(tmp_path / "fp4.onnx")).graph.input[0].name: x})
    assert _rel_err(got, with_weights(lin, {"0": rec})(x).detach()) < 1e-4


def test_fp4_w4a4_rejected(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    rec = quantize_weight("0", lin[0].weight, parse_spec("w4a16-fp4"), sample=torch.randn(16, 64))
    rec = dataclasses.replace(rec, a_format="e2m1", act_scale=torch.ones(1, dtype=torch.float16))
    with pytest.raises(LowbitError, match="W4A4"):
        export_onnx(lin, {"0": rec}, (torch.randn(1, 2, 64),), tmp_path / "fp4a4.onnx")
