"""lb.quantize -> Checkpoint -> save/load -> compile or swap: the calibrated (QuIP/OPTQ) flow end to end."""

import json
import os

import pytest
import torch
from tinymodels import tiny_llama

import lowbit_compile as lb
from lowbit_compile.errors import LowbitError

pytestmark = pytest.mark.usefixtures("fresh_compiler")  # conftest: empty compile and weight caches


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 320, (2, 24), generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def llama_ckpt():
    model = tiny_llama()
    return model, lb.quantize(model, "w3-quip", _batches(), progress=False)


def test_quantize_records_every_block_linear_with_its_proxy_loss(llama_ckpt):
    model, ck = llama_ckpt
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [p["fqn"] for p in ck.plan] == linears  # the plan is in model order
    assert set(ck.records) == set(linears) - {"lm_head"}
    assert all(r.method == "quip" and r.proxy_loss is not None and r.proxy_loss >= 0 for r in ck.records.values())
    assert ck.calibration["tokens"] == 144 and ck.calibration["sequential"]
    assert "lm_head" in ck.table() and "int3 quip" in ck.table()


@pytest.mark.drift
def test_save_load_rewrite_reproduces_outputs_bit_for_bit(llama_ckpt, tmp_path):
    model, ck = llama_ckpt
    ck.save(tmp_path / "ck")
    loaded = lb.Checkpoint.load(tmp_path / "ck")
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        direct = lb.swap_linears(model, ck.records)(ids).logits
        from_disk = lb.swap_linears(model, loaded.records)(ids).logits
        options = {"checkpoint": str(tmp_path / "ck"), "compiler": "eager"}
        compiled = torch.compile(model, backend="lowbit", options={**options, "kernels": "reference"})(ids).logits
        # the backend's CPU default (the int4pack fast path) reproduces the fast modules bit for bit
        fast = torch.compile(model, backend="lowbit", options=options)(ids).logits
        fast_modules = lb.swap_linears(model, loaded.records, fast=True)(ids).logits
    assert torch.equal(direct, from_disk) and torch.equal(direct, compiled) and torch.equal(fast, fast_modules)
    reasons = {r.fqn: r.reason for r in lb.last_report().kept_float}
    assert reasons["lm_head"].startswith("float in the checkpoint: output head kept in float")


def test_same_model_data_recipe_and_seed_give_byte_identical_checkpoints(tmp_path):
    model = tiny_llama(layers=1)
    for name in ("a", "b"):
        lb.quantize(model, "w2-quip", _batches()[:1], progress=False).save(tmp_path / name)
    for f in ("lowbit.safetensors", "lowbit.json"):
        a, b = (tmp_path / "a" / f).read_bytes(), (tmp_path / "b" / f).read_bytes()
        assert a == b
    meta = json.loads((tmp_path / "a" / "lowbit.json").read_text())
    assert meta["recipe"] == "w2-quip" and meta["seed"] == 0 and "torch" in meta["meta"]["versions"]
    other = lb.quantize(model, "w2-quip", _batches()[:1], progress=False, seed=1)
    rec0 = lb.Checkpoint.load(tmp_path / "a").records["model.layers.0.mlp.up_proj"]
    assert rec0.seed != other.records["model.layers.0.mlp.up_proj"].seed


def test_tampered_truncated_and_newer_checkpoints_are_refused(llama_ckpt, tmp_path):
    _, ck = llama_ckpt
    path = ck.save(tmp_path / "ck")
    tensors = os.path.join(path, "lowbit.safetensors")
    blob = bytearray(open(tensors, "rb").read())
    blob[-1] ^= 0xFF
    open(tensors, "wb").write(bytes(blob))
    with pytest.raises(LowbitError, match="checksum mismatch"):
        lb.Checkpoint.load(path)
    open(tensors, "wb").write(bytes(blob[:100]))
    with pytest.raises(LowbitError, match="truncated"):
        lb.Checkpoint.load(path)
    ck.save(path)
    meta_path = os.path.join(path, "lowbit.json")
    meta = json.loads(open(meta_path).read())
    meta["format_version"] = 99
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(LowbitError, match="format version 99 is newer"):
        lb.Checkpoint.load(path)
    with pytest.raises(LowbitError, match="is not a lowbit checkpoint"):
        lb.Checkpoint.load(tmp_path)


def test_a_checkpoint_from_another_model_is_refused(llama_ckpt):
    _, ck = llama_ckpt
    from tinymodels import tiny_qwen2

    with pytest.raises(LowbitError, match="belongs to another model"):
        lb.swap_linears(tiny_qwen2(), ck.records)


def test_calibrated_recipes_need_data_and_say_how_to_give_it():
    model = tiny_llama(layers=1)
    with pytest.raises(LowbitError, match="needs calibration data"):
        lb.quantize(model, "w4-quip", None, progress=False)
    with pytest.raises(LowbitError, match="calibration set is empty"):
        lb.quantize(model, "w4-quip", [], progress=False)
    with pytest.raises(LowbitError, match="needs the model's tokenizer"):
        lb.quantize(model, "w4-quip", ["some text"], progress=False)


def test_text_calibration_with_a_tokenizer(tmp_path):
    from tinymodels import minilm

    model, tok = minilm()
    f = tmp_path / "calib.txt"
    f.write_text("The first calibration sentence.\nA second line of English text.\n\n")
    ck = lb.quantize(model, lb.Recipe.parse("w4-quip", {"re:encoder\\.layer\\.[1-5]\\..*": None}), str(f),
                     tokenizer=tok, progress=False)
    assert len(ck.records) == 6 + 1  # layer 0's six linears + pooler
    assert ck.calibration["batches"] == 1


def test_data_free_recipes_need_no_calibration():
    ck = lb.quantize(tiny_llama(layers=1), "w4", progress=False)
    assert len(ck.records) == 7 and ck.calibration == {}


def test_quantize_hands_freed_heap_pages_back(monkeypatch):
    """lb.quantize trims the heap at the end (glibc keeps the per-layer temporaries otherwise: ~800 MB on the
    8-layer bench Llama, 1993 -> 1192 MB RSS after quantizing)."""
    from lowbit_compile import memory

    trims = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: trims.append)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    lb.quantize(model, "w4", progress=False)
    assert trims and set(trims) == {0}
