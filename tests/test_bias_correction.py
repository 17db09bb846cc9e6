"""Bias correction (recipe.LayerSpec.bias_correct, the default of the `e8` recipes but -ft; quantize/finetune.py):
after each group of a block's linears is quantized, a linear that has a bias gets the bias that makes its mean output
on the calibration data the float model's. The record holds that bias, and every consumer applies it instead of the
model's: lb.swap_linears, the torch.compile backend from a checkpoint, the exporters (tests/export: e8 records with a
bias of their own), a resumed run. Tiny Qwen2 (q/k/v have biases, o/gate/up/down none) and tiny OPT (every linear has
one); hidden sizes are multiples of 8, as E8 needs."""

import json

import pytest
import torch
from tinymodels import quantize_interrupted_then_resumed, tiny_opt, tiny_qwen2, token_batches

import lowbit_compile as lb
from lowbit_compile.checkpoint import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")
EAGER_REF = {"compiler": "eager", "kernels": "reference"}


def _batches(n=3):
    return token_batches(n, shape=(2, 12))


@pytest.fixture(scope="module")
def qwen_e8():
    model = tiny_qwen2()
    return model, lb.quantize(model, "w2-e8", _batches(), progress=False)


def test_only_linears_with_a_bias_get_one_and_the_plan_says_so(qwen_e8):
    model, ck = qwen_e8
    mods = dict(model.named_modules())
    for fqn, rec in ck.records.items():
        if mods[fqn].bias is None:
            assert rec.bias is None, fqn
        else:
            assert rec.bias.dtype == torch.float32 and rec.bias.shape == (rec.out_features,)
            assert not torch.equal(rec.bias, mods[fqn].bias.float())  # moved
            assert torch.equal(mods[fqn].bias, tiny_qwen2().get_submodule(fqn).bias)  # the user's model untouched
    corrected = {p["fqn"] for p in ck.plan if "bias_correction" in p}
    assert corrected == {f for f in ck.records if mods[f].bias is not None} and len(corrected) == 6  # q/k/v x 2
    entry = next(p["bias_correction"] for p in ck.plan if "bias_correction" in p)
    assert entry["mean_shift_rms"] > 0 and entry["bias_rms"] >= 0  # tiny_qwen2 starts with zero biases
    assert "e8p2 e8 + bias correction" in ck.table()


def _linear_means(model, batches, names):
    mods, sums, rows = dict(model.named_modules()), {}, {}

    def hook(name):
        def fn(mod, args, out):
            y = out.detach().reshape(-1, out.shape[-1]).double()
            sums[name] = sums.get(name, 0) + y.sum(0)
            rows[name] = rows.get(name, 0) + y.shape[0]
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return {n: sums[n] / rows[n] for n in names}


def test_the_first_blocks_corrected_mean_outputs_are_the_float_models():
    """Block 0 reads the same input in the float and the quantized model, so there the correction is exact: each
    linear's mean output over the calibration tokens is the float model's, to float32 rounding (the quantized model
    runs the lowbit reference op, the correction was computed on the dequantized weight: ~1e-6), where the same
    records with the model's biases miss it by the quantization error's mean (~1e-2 here)."""
    model = tiny_opt()
    batches = _batches()
    ck = lb.quantize(model, "w2-e8", batches, progress=False)
    names = [f for f in ck.records if f.startswith("model.decoder.layers.0.")]
    assert len(names) == 6 and all(ck.records[f].bias is not None for f in names)
    want = _linear_means(model, batches, names)
    got = _linear_means(lb.swap_linears(model, ck.records), batches, names)
    plain = {f: r for f, r in ck.records.items()}
    for r in plain.values():
        r.bias_saved, r.bias = r.bias, None
    try:
        uncorrected = _linear_means(lb.swap_linears(model, plain), batches, names)
    finally:
        for r in plain.values():
            r.bias = r.bias_saved
            del r.bias_saved
    for f in names:
        scale = want[f].abs().max()
        assert (got[f] - want[f]).abs().max() <= 1e-4 * scale, f
        # the q/k/v group is corrected first, on the float input; later groups after the earlier ones
        assert (uncorrected[f] - want[f]).abs().max() > 10 * (got[f] - want[f]).abs().max(), f


def test_the_checkpoint_keeps_the_biases_and_the_backend_applies_them(qwen_e8, tmp_path):
    model, ck = qwen_e8
    ck.save(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "lowbit.json").read_text())["format_version"] == FORMAT_VERSION == 4
    loaded = lb.Checkpoint.load(tmp_path / "ck")
    for fqn, rec in ck.records.items():
        back = loaded.records[fqn].bias
        assert (rec.bias is None and back is None) or torch.equal(rec.bias, back)
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        swapped = lb.swap_linears(model, loaded.records)(ids).logits
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": str(tmp_path / "ck"),
                                                                    **EAGER_REF})(ids).logits
        for rec in loaded.records.values():
            rec.bias = None
        with_model_bias = lb.swap_linears(model, loaded.records)(ids).logits
    assert torch.equal(compiled, swapped)
    assert (swapped - with_model_bias).abs().max() > 1e-4  # the record's biases are what the backend ran


def test_bias_correction_is_deterministic_and_resumes_byte_identically(qwen_e8, tmp_path, monkeypatch):
    model, ck = qwen_e8
    ck.save(tmp_path / "first")
    resumed = quantize_interrupted_then_resumed(model, "w2-e8", _batches(), tmp_path / "work", monkeypatch,
                                                "model.layers.1.")
    resumed.save(tmp_path / "resumed")
    for name in ("lowbit.safetensors", "lowbit.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_an_older_checkpoint_without_biases_still_loads(qwen_e8, tmp_path):
    model, ck = qwen_e8
    for rec in ck.records.values():
        rec.bias_saved, rec.bias = rec.bias, None
    try:
        ck.save(tmp_path / "old")
    finally:
        for rec in ck.records.values():
            rec.bias = rec.bias_saved
            del rec.bias_saved
    meta = json.loads((tmp_path / "old" / "lowbit.json").read_text())
    meta["format_version"] = 3
    meta.pop("meta_sha256")  # as a file from before the metadata checksum: this edit would not match it
    (tmp_path / "old" / "lowbit.json").write_text(json.dumps(meta))
    loaded = lb.Checkpoint.load(tmp_path / "old")
    assert all(r.bias is None for r in loaded.records.values())
