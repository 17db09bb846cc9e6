"""Quantized token embeddings (quantize/core.quantize_embeddings, kernels/embedding.py, nn.LowbitEmbedding,
passes/rewrite_embeddings.py): named by an override, shared with a tied head, stored once in the checkpoint, and
the same numbers through swap_linears and torch.compile."""

import pytest
import torch
from tinymodels import tiny_llama

import lowbit_compile as lb
from lowbit_compile.errors import LowbitError
from lowbit_compile.kernels.specs import EMBEDDING
from lowbit_compile.nn import LowbitEmbedding

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")
EMB = "model.embed_tokens"


@pytest.fixture(scope="module")
def tied():
    model = tiny_llama(tie=True)
    ckpt = lb.quantize(model, "w3", None, overrides={EMB: "w4-rtn-g32"}, progress=False)
    return model, ckpt


def test_the_op_gathers_the_dequantized_rows_exactly(tied):
    _, ckpt = tied
    rec = ckpt.records[EMB]
    ids = torch.tensor([[0, 319, 7], [7, 7, 1]])
    args = dict(qweight=rec.qweight, scales=rec.scales, bits=4, embedding_dim=192, group_size=32)
    assert torch.equal(EMBEDDING(ids=ids, **args), rec.dequantized_weight()[ids])
    torch.library.opcheck(EMBEDDING.op, (ids, *args.values()))


def test_a_named_embedding_is_quantized_and_its_tied_head_shares_it(tied, tmp_path):
    model, ckpt = tied
    assert ckpt.records["lm_head"] is ckpt.records[EMB]
    plan = {p["fqn"]: p for p in ckpt.plan}
    assert plan[EMB]["module"] == "embedding" and plan["lm_head"]["shares"] == EMB
    assert ckpt.records[EMB].bits_per_weight() == pytest.approx(4.5)  # codes + a float16 scale per 32
    loaded = lb.Checkpoint.load(ckpt.save(str(tmp_path / "ck")))
    assert loaded.records["lm_head"] is loaded.records[EMB]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ck" / "lowbit.safetensors"))
    assert (f"{EMB}.qweight" in stored) != ("lm_head.qweight" in stored)  # one table in the file
    q = lb.swap_linears(model, loaded)
    assert isinstance(q.model.embed_tokens, LowbitEmbedding) and q.lm_head.qweight is q.model.embed_tokens.qweight


def test_swap_and_compile_agree_and_the_embedding_really_changed(tied):
    model, ckpt = tied
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        ref = lb.swap_linears(model, ckpt)(ids).logits
        y = torch.compile(model, backend="lowbit", options={"checkpoint": ckpt, "kernels": "reference",
                                                            "compiler": "eager"})(ids).logits
        head_only = lb.swap_linears(model, {k: v for k, v in ckpt.records.items() if k not in (EMB, "lm_head")})
        y_float_emb = head_only(ids).logits
    assert float((y - ref).norm() / ref.norm()) < 1e-5  # float rounding (rotated_linear vs its reference)
    assert float((ref - y_float_emb).norm() / ref.norm()) > 1e-3  # the quantized table is what ran
    report = lb.last_report()
    rows = {r.fqn: r for r in report.layers}
    assert rows[EMB].runtime.startswith("embedding 4.50") and rows["lm_head"].status == "quantized"


def test_the_backend_quantizes_a_named_embedding_from_its_options():
    model = tiny_llama(tie=True)
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w4", "overrides": {EMB: "w8-rtn"},
                                                         "compiler": "eager", "kernels": "reference"})(ids)
    rows = {r.fqn: r for r in lb.last_report().layers}
    assert rows[EMB].spec == "int8 rtn" and "shares the quantized embedding" in rows["lm_head"].reason


def test_bad_embedding_recipes_say_what_to_do():
    model = tiny_llama(tie=True)
    with pytest.raises(LowbitError, match=r"embedding model.embed_tokens: int4 rtn \+ incoherence rotates.*w4-rtn-g32"):
        lb.quantize(model, "w4", None, overrides={EMB: "w4"}, progress=False)
    with pytest.raises(LowbitError, match=r"lm_head and embedding model.embed_tokens share one weight"):
        lb.quantize(model, "w4", None, overrides={EMB: "w8-rtn", "lm_head": "w4"}, progress=False)
    ck = lb.quantize(model, "w4", None, overrides={"re:.*embed.*": "w4"}, progress=False)  # a pattern: float, said
    entry = next(p for p in ck.plan if p["fqn"] == EMB)
    assert entry["spec"] == "float" and "which an embedding cannot use" in entry["reason"]
    assert EMB not in ck.records


def test_an_untied_model_quantizes_the_embedding_alone():
    model = tiny_llama(tie=False)
    ck = lb.quantize(model, "w4", None, overrides={EMB: "w8-rtn"}, progress=False)
    assert EMB in ck.records and "lm_head" not in ck.records
