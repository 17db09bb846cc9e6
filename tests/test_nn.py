"""nn.py: records as modules (swap_linears), the form the exporters and eager users run."""

from __future__ import annotations

import pytest
import torch
from tinymodels import tiny_llama

import lowbit_compile as lb
from lowbit_compile.errors import LowbitError
from lowbit_compile.nn import LowbitEmbedding, LowbitLinear, swap_linears
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()


def _records(model, recipe="w4"):
    return {n: quantize_weight(n, m.weight, parse_spec(recipe), seed=0) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_swap_copies_unless_inplace_and_runs_the_records_weights():
    model = _mlp()
    recs = _records(model)
    q = swap_linears(model, recs)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(q[0], LowbitLinear)  # the user's model untouched
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = torch.relu(x @ recs["0"].dequantized_weight().T + model[0].bias) @ recs["2"].dequantized_weight().T
        ref = ref + model[2].bias
        assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)
    same = swap_linears(model, recs, inplace=True)
    assert same is model and isinstance(model[2], LowbitLinear)


def test_fast_forms_match_the_reference_modules():
    model = _mlp()
    recs = _records(model, "w2")
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref, fast = swap_linears(model, recs)(x), swap_linears(model, recs, fast=True)(x)
    # the fast kernels quantize activations to int8 in blocks of 32 (kernels/cpu_native.py): ~1 % of the output
    assert float((fast - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_bad_requests_are_clear_errors():
    model = _mlp()
    recs = _records(model)
    with pytest.raises(LowbitError, match="either make_module or fast=True"):
        swap_linears(model, recs, fast=True, make_module=lambda rec, bias: None)
    with pytest.raises(LowbitError):  # a record for a layer the model does not have
        swap_linears(model, {"5": recs["0"]})
    emb = torch.nn.Sequential(torch.nn.Embedding(32, 64, max_norm=1.0))
    rec = quantize_weight("0", emb[0].weight, parse_spec("w4-rtn-g32"), seed=0)
    with pytest.raises(LowbitError, match="max_norm renormalizes rows"):
        swap_linears(emb, {"0": rec})


def test_a_tied_head_reads_the_embeddings_buffers():
    model = tiny_llama(tie=True, layers=1)
    ck = lb.quantize(model, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32"}, progress=False)
    assert ck.records["lm_head"] is ck.records["model.embed_tokens"]
    q = swap_linears(model, ck.records)
    assert isinstance(q.model.embed_tokens, LowbitEmbedding)
    assert q.lm_head.qweight is q.model.embed_tokens.qweight  # one table in memory, not two
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        emb = q.model.embed_tokens(ids)
    assert torch.equal(emb[0], ck.records["model.embed_tokens"].dequantized_weight()[ids[0]])


def test_a_tied_heads_fast_form_keeps_its_own_float32_scales():
    """The fast form of a tied head repacks the embedding's codes and widens its float16 scales: sharing the
    embedding's buffers there would hand the kernel float16 scales (torch.equal calls them equal)."""
    model = tiny_llama(tie=True, layers=1)
    ck = lb.quantize(model, "w4", None, overrides={"model.embed_tokens": "w4-rtn-g32"}, progress=False)
    fast = swap_linears(model, ck.records, fast=True)
    ref = swap_linears(model, ck.records)
    ids = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        y, r = fast(ids).logits, ref(ids).logits
    assert float((y - r).abs().max()) <= 0.05 * float(r.abs().max())  # int8 activations in the fast kernels
