"""torch.compile(model, backend="lowbit") on real HF graphs: every block linear rewritten, outputs equal to a
float model that applies the same dequantized weights, and recompiles that never quantize again.

Tolerance: the rotated path computes Hadamard transforms in float32 (about log2(n) roundings per element),
so it differs from a float32 matmul with the dequantized weight by ~1e-6 relative; 1e-4 absolute on O(1)
outputs leaves margin while quantization itself moves outputs by ~1e-1 (asserted too, so the comparison is
not vacuous). That float-level comparison needs the reference kernels, so these tests ask for them
(options kernels="reference"); the CPU fast path the backend picks by default (int4pack, bfloat16 activations)
is compared with the reference in tests/kernels/test_cpu_fast.py."""

import subprocess
import sys
import warnings

import pytest
import torch
from tinymodels import minilm, tiny_llama, tiny_opt, tiny_qwen2, with_weights

import lowbit_compile as lb
from lowbit_compile.backend import CACHE

pytestmark = pytest.mark.usefixtures("fresh_compiler")  # conftest: empty compile and weight caches


def block_linears(model, skip=("lm_head",)):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip}


REFERENCE = {"kernels": "reference"}


def _check_model(model, make_inputs, output, options, expected):
    options = {**REFERENCE, **options}
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options=options)
        y = output(compiled(**make_inputs(2, 9)))
        report = lb.last_report()
        assert {r.fqn for r in report.quantized} == expected
        assert report.rewritten == len(expected)  # ops counted in the rewritten graph
        ref = with_weights(model, report.records)
        assert torch.allclose(y, output(ref(**make_inputs(2, 9))), atol=1e-4, rtol=1e-4)
        assert (y - output(model(**make_inputs(2, 9)))).abs().max() > 1e-3  # quantization really happened

        n_quantized, n_reports = CACHE.quantized, len(lb.REPORTS)
        y2 = output(compiled(**make_inputs(3, 5)))  # new shape: Dynamo recompiles, nothing is re-quantized
        assert len(lb.REPORTS) > n_reports and CACHE.quantized == n_quantized
        assert all(r.cached for r in lb.last_report().quantized)
        assert torch.allclose(y2, output(ref(**make_inputs(3, 5))), atol=1e-4, rtol=1e-4)


def _ids(vocab):
    def make(batch, seq):
        g = torch.Generator().manual_seed(batch * 100 + seq)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    return make


def _logits(out):
    return out.logits


@pytest.mark.drift
@pytest.mark.slow
def test_llama_through_inductor():
    model = tiny_llama()
    _check_model(model, _ids(320), _logits, {"recipe": "w4"}, block_linears(model))


@pytest.mark.drift
def test_qwen2_with_qkv_bias():
    model = tiny_qwen2()
    _check_model(model, _ids(320), _logits, {"recipe": "w4", "compiler": "eager"}, block_linears(model))


def test_opt_with_tied_head_quantized_keeps_the_embedding_float():
    model = tiny_opt()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    expected = block_linears(model, skip=()) - {"model.decoder.project_in", "model.decoder.project_out"}
    _check_model(model, _ids(320), _logits, {"recipe": "w3", "compiler": "eager", "overrides": {"lm_head": "w4"}},
                 expected)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # the model itself is untouched


@pytest.mark.drift
@pytest.mark.slow
def test_real_minilm_through_inductor():
    model, tok = minilm()
    sentences = ["The quick brown fox jumps over the lazy dog.", "Quantization makes models small.",
                 "Hadamard rotations spread outliers.", "A fourth sentence to fill a batch of three."]

    def make(batch, seq):
        enc = tok(sentences[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return dict(enc)

    expected = block_linears(model)
    assert len(expected) == 37  # 6 layers x 6 linears + the pooler
    _check_model(model, make, lambda out: out.last_hidden_state, {"recipe": "w4"}, expected)


@pytest.mark.drift
def test_backend_is_found_by_entry_point_in_a_fresh_interpreter():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24)).eval()\n"
        "assert 'lowbit_compile' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='lowbit', options={'compiler': 'eager'})(torch.randn(2, 24))\n"
        "import lowbit_compile\n"
        "print(lowbit_compile.last_report().rewritten, tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2 (2, 24)"


def _compile_call(model, options, *args):
    with torch.no_grad():
        return torch.compile(model, backend="lowbit", options=options)(*args)


def test_unknown_option_key_lists_the_valid_ones():
    with pytest.raises(Exception, match=r"unknown lowbit option\(s\) \['recipy'\]; valid options: .*'recipe'"):
        _compile_call(torch.nn.Linear(8, 8), {"recipy": "w4"}, torch.randn(2, 8))


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(Exception, match="unknown recipe 'w5'; valid recipes: w2, "):
        _compile_call(torch.nn.Linear(8, 8), {"recipe": "w5"}, torch.randn(2, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    with torch.no_grad():
        model[1].weight[3, 2] = bad
    with pytest.raises(Exception, match=r"layer 1: weight has \d NaN and \d Inf values.*overrides=\{'1': None\}"):
        _compile_call(model, {"compiler": "eager"}, torch.randn(2, 8))


def test_fallback_keeps_the_float_graph_with_a_warning():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="running this graph in float"):
        y = _compile_call(model, {"compiler": "eager", "fallback": True}, torch.ones(2, 8))
    assert torch.isnan(y).any()  # the float model, as it is


def test_model_without_linears_warns_and_still_runs():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.ReLU())
    with pytest.warns(UserWarning, match="no linear layers .* nothing was quantized"):
        y = _compile_call(model, {"compiler": "eager"}, torch.randn(1, 2, 8))
    assert y.shape == (1, 2, 6)


def test_layers_kept_in_float_are_reported_with_the_reason():
    model = tiny_llama(layers=1)
    _compile_call(model, {"compiler": "eager", "overrides": {"re:.*k_proj": None}},
                  torch.randint(0, 320, (1, 4)))
    floats = {r.fqn: r.reason for r in lb.last_report().kept_float}
    assert floats["lm_head"].startswith("output head kept in float")
    assert floats["model.layers.0.self_attn.k_proj"] == "override 're:.*k_proj'"
    assert "kept in float" in lb.last_report().table()


def test_training_mode_graphs_get_input_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 24))
    x = torch.randn(3, 24, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend="lowbit", options={"compiler": "eager", **REFERENCE})(x).sum().backward()
    ref = with_weights(model, lb.last_report().records)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_calibrating_recipe_without_checkpoint_calibrates_on_the_first_call(caplog):
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad(), caplog.at_level("WARNING", logger="lowbit_compile"):
        compiled = torch.compile(model, backend="lowbit", options={"recipe": "w3-quip", "compiler": "eager",
                                                                    **REFERENCE})
        y = compiled(ids).logits
        compiled(torch.randint(0, 320, (1, 5)))  # a recompile: no second calibration, no re-quantization
    assert sum("calibrating on the first call's inputs (32 tokens)" in r.message for r in caplog.records) == 1
    report = lb.REPORTS[0]
    assert {r.spec for r in report.quantized} == {"int3 quip"}
    assert all(r.cached for r in lb.last_report().quantized)
    assert torch.allclose(y, with_weights(model, report.records)(ids).logits, atol=1e-4)


@pytest.mark.parametrize("recipe, step", [("w2-e8", "bias correction"), ("w2-e8-ft", "fine-tuning")])
def test_the_backend_says_when_it_quantizes_without_a_recipes_block_steps(recipe, step, caplog):
    model = tiny_llama(layers=1)
    with torch.no_grad(), caplog.at_level("WARNING", logger="lowbit_compile"):
        torch.compile(model, backend="lowbit", options={"recipe": recipe, "compiler": "eager", **REFERENCE})(
            torch.randint(0, 320, (2, 16)))
    said = [r.message for r in caplog.records if "runs block by block in lb.quantize" in r.message]
    assert len(said) == 1 and f"asks for {step}," in said[0] and "options={'checkpoint': FOLDER}" in said[0]


def test_checkpoint_option_takes_an_object_and_rejects_other_types():
    model = tiny_llama(layers=1)
    ck = lb.quantize(model, "w4", progress=False)
    ids = torch.randint(0, 320, (1, 6))
    y = _compile_call(model, {"checkpoint": ck, "compiler": "eager", **REFERENCE}, ids).logits
    assert lb.last_report().rewritten == 7 and CACHE.quantized == 0  # nothing quantized at compile time
    with torch.no_grad():
        assert torch.equal(y, lb.swap_linears(model, ck.records)(ids).logits)
    with pytest.raises(Exception, match="option checkpoint: expected a Checkpoint or a folder path"):
        _compile_call(model, {"checkpoint": 3}, ids)


def test_quantization_packs_each_layer_as_it_goes_and_trims_the_heap_after(monkeypatch):
    """Freed quantization temporaries go back to the OS (glibc malloc_trim) at the end of quantize_graph, and
    each layer is packed for its CPU kernel right after it is quantized (RewriteLinears reuses that packed form)."""
    from lowbit_compile import memory
    from lowbit_compile.kernels import cpu, cpu_native

    trims = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: trims.append)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (1, 6))
    _compile_call(model, {"compiler": "eager"}, ids)
    report = lb.last_report()
    caches = {cpu.RUNTIME_NAME: cpu._PACKED, cpu_native.RUNTIME_NAME: cpu_native._PACKED}
    packed = [(r, caches[r.runtime.split()[0]]) for r in report.quantized if r.runtime.split()[0] in caches]
    assert len(packed) == 7 and all(id(report.records[r.fqn]) in cache for r, cache in packed)
    assert trims and set(trims) == {0}


def test_release_freed_memory_is_a_no_op_off_linux(monkeypatch):
    from lowbit_compile import memory

    memory._malloc_trim.cache_clear()
    try:
        monkeypatch.setattr(sys, "platform", "darwin")
        assert memory._malloc_trim() is None
        memory.release_freed_memory()
    finally:
        monkeypatch.undo()
        memory._malloc_trim.cache_clear()
    if sys.platform.startswith("linux"):
        memory.release_freed_memory()  # the real glibc call
