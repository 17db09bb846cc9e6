"""lb.quantize over 2 processes against one (issue 21): torchrun, gloo, one thread per rank, on all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct, and whether the two checkpoints are the same bytes.

Each run is a fresh child: one process (`python CHILD`), or two started by `python -m torch.distributed.run
--standalone --nproc-per-node 2 CHILD`. The child loads the model and its calibration (the same data as
bench.quantize_time: MiniLM's 128 standard-library sentences in 8 batches, SmolLM2's 32 chunks of 256 tokens in 8
batches of 4), waits for the other rank, and times `lb.quantize` alone (rank 0's wall clock, barrier to barrier):
that is what the processes share. The whole command (interpreter start, imports, model load, saving) is timed
too: each rank pays its start-up in parallel, so it shrinks the ratio of a short run. The CPU seconds of
lb.quantize per rank (time.process_time) say what the speed-up would be on idle cores when the machine is shared:
one process's CPU time over the busiest rank's (waiting in an exchange costs no CPU). --smollm2-blocks N keeps the
first N of SmolLM2's 30 decoder blocks (both runs the same model; a ratio, not an extrapolation).

--repeat K runs the pair K times, one process and N processes in turn (the machine's drift hits both alike), and
reports the median of each, with the range of the speed-ups: on this shared 2-core machine single runs of MiniLM
spread by ±8 %.

    python -m bench.distributed [--models minilm,smollm2] [--recipe w2-quip] [--smollm2-blocks N] [--repeat K] [--doc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lowbit_compile.io import tree_digest

from .common import cpu_name, load_average, machine, markdown_table, publish

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import torch.distributed as dist
import lowbit_compile as lb
from lowbit_compile import distributed
kind, recipe, out, blocks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
distributed.init()
if kind == "minilm":
    from lowbit_compile.demo import load_minilm
    from lowbit_compile.pipeline import default_calibration
    model, tok = load_minilm()
    calibration = default_calibration(tok)
else:
    from lowbit_compile.evaluate import text_chunks
    from lowbit_compile.hf import load_smollm2
    loaded = load_smollm2()
    model, tok = loaded.model, None
    calibration = list(text_chunks(loaded.tokenizer, "calibration", max_chunks=32).split(4))
    if blocks:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
if dist.is_initialized():
    dist.barrier()
t, cpu = time.perf_counter(), time.process_time()
ck = lb.quantize(model, recipe, calibration, tokenizer=tok, seed=0, progress=False)
cpu = time.process_time() - cpu
if dist.is_initialized():
    dist.barrier()
seconds = time.perf_counter() - t
cpus = distributed.exchange(cpu, "cpu seconds") if dist.is_initialized() else [cpu]
if distributed.rank() == 0:
    ck.save(out)
    print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpus, "batches": len(calibration)}), flush=True)
"""


def run(kind: str, recipe: str, nproc: int, blocks: int) -> dict:
    """One child run: lb.quantize seconds, whole-command seconds, checkpoint digest."""
    work = tempfile.mkdtemp(prefix="lowbit-dist-")
    script, out = os.path.join(work, "child.py"), os.path.join(work, "ck")
    with open(script, "w") as f:
        f.write(CHILD)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        t = time.perf_counter()
        proc = subprocess.run([*launcher, script, kind, recipe, out, str(blocks)], env=env, capture_output=True,
                              text=True)
        whole = time.perf_counter() - t
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{kind} with {nproc} process(es) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        return {**result, "whole": whole, "digest": tree_digest(out)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median(runs: list[dict]) -> dict:
    """The run of median lb.quantize seconds (its CPU and whole-command figures with it)."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] if len(runs) % 2 else {
        **runs[0], "seconds": statistics.median(r["seconds"] for r in runs),
        "whole": statistics.median(r["whole"] for r in runs),
        "cpu": [statistics.median(c) for c in zip(*(r["cpu"] for r in runs))]}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--recipe", default="w2-quip")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--smollm2-blocks", type=int, default=0, help="keep the first N decoder blocks (0: all 30)")
    ap.add_argument("--quick", action="store_true", help="MiniLM only")
    ap.add_argument("--repeat", type=int, default=1, help="run the pair K times, in turn; medians")
    ap.add_argument("--doc", action="store_true", help="also update docs/benchmarks.md")
    args = ap.parse_args(argv)
    models = ["minilm"] if args.quick else args.models.split(",")

    rows = []
    for kind in models:
        blocks = args.smollm2_blocks if kind == "smollm2" else 0
        ones, manys = [], []
        for _ in range(max(1, args.repeat)):
            ones.append(run(kind, args.recipe, 1, blocks))
            print(kind, "1 process", ones[-1], flush=True)
            manys.append(run(kind, args.recipe, args.nproc, blocks))
            print(kind, f"{args.nproc} processes", manys[-1], flush=True)
        one, many = _median(ones), _median(manys)
        ratios = sorted(o["seconds"] / m["seconds"] for o, m in zip(ones, manys))
        spread = f" ({ratios[0]:.2f}–{ratios[-1]:.2f} over {len(ratios)} pairs)" if len(ratios) > 1 else ""
        name = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M"}[kind] + (f" ({blocks} blocks)" if blocks
                                                                                 else "")
        rows.append([name, f"`{args.recipe}`", one["batches"], f"{one['seconds']:.1f}", f"{many['seconds']:.1f}",
                     f"**{one['seconds'] / many['seconds']:.2f}×**{spread}",
                     f"{one['cpu'][0]:.1f} / {' + '.join(f'{c:.1f}' for c in many['cpu'])}",
                     f"{one['cpu'][0] / max(many['cpu']):.2f}×", f"{one['whole']:.0f} / {many['whole']:.0f}",
                     "yes" if len({r["digest"] for r in ones + manys}) == 1 else "**no**"])
    runs = f"median of {args.repeat} runs each, in turn; " if args.repeat > 1 else ""
    text = [f"`lb.quantize` in one process against {args.nproc} ({runs}torchrun, gloo, one thread per rank; "
            f"{machine()}; {cpu_name()}; {load_average()} at the end). Seconds of lb.quantize alone (rank 0, barrier "
            f"to barrier), and of the whole command (start-up, model load and saving included).", "",
            markdown_table(["model", "recipe", "batches", "1 process s", f"{args.nproc} processes s", "speed-up",
                            "CPU s (1 / per rank)", "CPU ratio (1 / busiest rank)", "whole command s (1 / N)",
                            "same checkpoint bytes"], rows)]
    return publish("distributed", "\n".join(text), doc=args.doc)


if __name__ == "__main__":
    main(sys.argv[1:])
