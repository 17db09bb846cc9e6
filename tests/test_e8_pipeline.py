"""E8 end to end: lb.quantize with "w2-e8" and "w2-e8-ft" on a tiny Llama (hidden 192, MLP 344: multiples of 8),
the checkpoint compiled by the backend against lb.swap_linears (reference op: bit for bit; native kernel: within the
int8-activation error), block fine-tuning (lower block-output error, tuned values in the records, deterministic).
Fine-tuning runs a few steps here; lb.quantize's default is quantize/finetune.SETTINGS."""

import pytest
import torch
from tinymodels import quantize_interrupted_then_resumed, tiny_llama

import lowbit_compile as lb
from lowbit_compile.backend import CACHE
from lowbit_compile.kernels import native
from lowbit_compile.quantize import finetune
from lowbit_compile.quantize.records import E8QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")
EAGER_REF = {"compiler": "eager", "kernels": "reference"}
STEPS = finetune.FinetuneSettings(steps=12, lr=5e-3)


def _batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 320, (2, 16), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def llama_e8():
    """(model, w2-e8 checkpoint, w2-e8-ft checkpoint)"""
    model = tiny_llama()
    plain = lb.quantize(model, "w2-e8", _batches(), progress=False)
    saved, finetune.SETTINGS = finetune.SETTINGS, STEPS
    try:
        tuned = lb.quantize(model, "w2-e8-ft", _batches(), progress=False)
    finally:
        finetune.SETTINGS = saved
    return model, plain, tuned


def test_e8_recipes_make_e8_records_for_every_block_linear(llama_e8):
    model, plain, tuned = llama_e8
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    for ck in (plain, tuned):
        assert set(ck.records) == linears
        assert all(isinstance(r, E8QuantizedLinear) and r.bits == 2 for r in ck.records.values())
    assert "e8p2 e8" in plain.table() and "e8p2 e8 + fine-tuning" in tuned.table()
    assert all(abs(r.bits_per_weight() - 2) < 0.1 for r in plain.records.values())


@pytest.mark.parametrize("which", ["plain", "tuned"])
def test_checkpoint_compiles_to_the_swapped_modules_outputs(llama_e8, which, tmp_path):
    model, plain, tuned = llama_e8
    ck = {"plain": plain, "tuned": tuned}[which]
    ck.save(tmp_path / "ck")
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        swapped = lb.swap_linears(model, lb.Checkpoint.load(tmp_path / "ck").records)(ids).logits
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": str(tmp_path / "ck"),
                                                                    **EAGER_REF})(ids).logits
        float_out = model(ids).logits
    assert torch.equal(compiled, swapped)
    report = lb.last_report()
    assert report.rewritten == 14 and CACHE.quantized == 0
    assert all(r.runtime.startswith("e8p_linear") for r in report.quantized)
    assert (compiled - float_out).abs().max() > 1e-3  # quantization really happened


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
def test_the_backend_runs_e8_records_on_the_native_kernel(llama_e8):
    model, plain, _ = llama_e8
    ids = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": plain, "compiler": "eager"})
        fast = compiled(ids).logits
        swapped = lb.swap_linears(model, plain.records)(ids).logits
        float_out = model(ids).logits
    report = lb.last_report()
    assert report.rewritten == 14
    assert all(r.runtime.startswith("native int4 digits of e8p2") for r in report.quantized)
    assert (fast - swapped).norm() <= 0.05 * (swapped - float_out).norm()  # int8 activations: far below quantization
    assert "CPU kernel of 14 integer layer(s): E8 codes as 4-bit digits on the native kernel (one 4-bit pass)" in \
        report.notes


def _block_error(model, records, prefix, batches):
    """Relative squared error of one block's output against the float block, on the float model's block inputs."""
    block = model.get_submodule(prefix)
    inputs = []
    hook = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    hook.remove()
    swapped = lb.swap_linears(model, records).get_submodule(prefix)
    err = ref = 0.0
    with torch.no_grad():
        for a, k in inputs:
            y, y_q = block(*a, **k), swapped(*a, **k)
            y, y_q = (y[0], y_q[0]) if isinstance(y, tuple) else (y, y_q)
            err, ref = err + float((y_q - y).square().sum()), ref + float(y.square().sum())
    return err / ref


def test_fine_tuning_lowers_the_block_output_error_and_keeps_the_codes(llama_e8):
    model, plain, tuned = llama_e8
    entries = {p["fqn"]: p for p in tuned.plan}
    first = entries["model.layers.0.self_attn.q_proj"]["finetune"]
    assert first["kept"] and first["error_after"] < first["error_before"]
    # the groups of linears that read one input, in the order they run, one tuning stage after each
    prefix = "model.layers.0"
    assert [s["layers"] for s in first["stages"]] == [
        [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], [f"{prefix}.self_attn.o_proj"],
        [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], [f"{prefix}.mlp.down_proj"]]
    assert all(s["error_after"] <= s["error_before"] for s in first["stages"])
    # block 0's first group sees the same inputs and weights in both runs: the same codes, other scales and signs
    p, t = plain.records[f"{prefix}.self_attn.q_proj"], tuned.records[f"{prefix}.self_attn.q_proj"]
    assert torch.equal(p.qweight, t.qweight) and not torch.equal(p.scales, t.scales)
    assert not torch.equal(p.su, t.su) and torch.equal(p.su.sign(), t.su.sign())
    assert torch.equal(t.su, t.su.half().float()) and t.proxy_loss is None
    assert 2 < t.bits_per_weight() < 2.3  # real sign vectors: 16 bits each
    # the last group was quantized from weights tuned to make up for the groups before it: other codes
    down = f"{prefix}.mlp.down_proj"
    assert not torch.equal(plain.records[down].qweight, tuned.records[down].qweight)
    assert (_block_error(model, tuned.records, prefix, _batches())
            < _block_error(model, plain.records, prefix, _batches()))


def test_fine_tuning_leaves_the_users_model_as_it_was():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    saved, finetune.SETTINGS = finetune.SETTINGS, finetune.FinetuneSettings(steps=2, lr=5e-3)
    try:
        lb.quantize(model, "w2-e8-ft", _batches(1), progress=False)
    finally:
        finetune.SETTINGS = saved
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(type(m).__name__ != "_Tuned" for m in model.modules())


def test_fine_tuning_is_deterministic(llama_e8, tmp_path):
    model, _, tuned = llama_e8
    saved, finetune.SETTINGS = finetune.SETTINGS, STEPS
    try:
        again = lb.quantize(model, "w2-e8-ft", _batches(), progress=False)
    finally:
        finetune.SETTINGS = saved
    tuned.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("lowbit.safetensors", "lowbit.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_interrupted_fine_tuning_run_resumes_byte_identically(tmp_path, monkeypatch):
    """A resumed -ft run tunes the next block to the same targets: the float model's hidden states are carried
    through the blocks an earlier run finished, as if they had been tuned in this run."""
    model = tiny_llama(layers=3)
    monkeypatch.setattr(finetune, "SETTINGS", finetune.FinetuneSettings(steps=3, lr=5e-3))
    expected = lb.quantize(model, "w2-e8-ft", _batches(), progress=False)
    expected.save(tmp_path / "uninterrupted")
    resumed = quantize_interrupted_then_resumed(model, "w2-e8-ft", _batches(), tmp_path / "work", monkeypatch,
                                                "model.layers.2.")
    resumed.save(tmp_path / "resumed")
    for name in ("lowbit.safetensors", "lowbit.json"):
        assert (tmp_path / "uninterrupted" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
