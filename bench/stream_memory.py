"""Peak memory of quantizing a model streamed from disk (issue 21): a synthetic Llama written as safetensors shards
(one per block, random float32 weights, N(0, 0.02)), quantized with `lb.quantize(folder, "w2-quip", ...)` in a fresh
child process whose peak resident set (VmHWM of /proc/self/status) is compared with the size of the float weights.

The default shape (hidden 512, MLP 1536, 112 blocks, vocabulary 4096: 1.53 GB of float32 weights, 13.6 MB per
block) took 523 s at one thread on a 2-core AVX2 machine shared with other jobs (load average 5.4): peak 1001 MiB
(402 MiB after imports), 1.47x less than the weights, 2.5x above the import baseline. The peak creeps up with the
block count (812 MiB for 8 blocks): the returned checkpoint's records (2-bit codes, ~1 MB per block here) stay in
memory, and the heap fragments. `--layers 340` (4437 MiB of weights) peaked at 1448 MiB, 3.06x less than the
weights, in 651 s (one thread, AVX2, quiet machine). Narrow blocks are on purpose: the time per
weight byte grows with the layer width (LDLQ is O(rows x cols^2)) and so does the working memory of quantizing a
block (float64 Hessians and LDLQ temporaries, O(cols^2): about 300 MB at hidden 512 / MLP 1536, 700 MB at
1024 / 2816), so at a fixed time a narrow, deep model shows the largest weights/peak ratio. The child's VmHWM
includes the interpreter, torch and transformers (the "after imports" column: what any process that quantizes
pays); the calibration is 2 batches of 1 x 64 random tokens, so the boundary activations are small.

    python -m bench.stream_memory [--layers 112] [--hidden 512] [--intermediate 1536] [--in-memory] [--keep DIR]

--in-memory also measures lb.quantize(AutoModelForCausalLM.from_pretrained(folder), ...) in another child (it needs
the whole model in memory: use it on a small --layers to see the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from .common import cpu_name, load_average, machine, markdown_table, publish

CHILD = r"""
import json, sys, time
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
import torch
torch.set_num_threads(1)
import lowbit_compile as lb
import transformers  # what streaming imports anyway: counted in the baseline
folder, recipe, mode, out = sys.argv[1:5]
g = torch.Generator().manual_seed(0)
batches = [torch.randint(0, int(sys.argv[5]), (1, 64), generator=g) for _ in range(2)]
base = hwm()
t = time.perf_counter()
model = folder
if mode == "memory":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
ck = lb.quantize(model, recipe, batches, progress=False)
seconds = time.perf_counter() - t
ck.save(out)
print("RESULT " + json.dumps({"baseline": base, "peak": hwm(), "seconds": seconds, "records": len(ck.records)}))
"""


def write_model(folder: str, layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0) -> int:
    """A LlamaForCausalLM folder (config.json, one safetensors shard per block and one for the rest, the index json)
    written one block at a time; returns the bytes of float weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    heads = max(hidden // 64, 1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    shards = [("rest", {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden),
                        "lm_head.weight": rand(vocab, hidden)})]
    for i in range(layers + 1):
        name, tensors = shards.pop() if i == 0 else (f"layers.{i - 1}", _block(i - 1, hidden, intermediate, rand))
        path = f"model-{name}.safetensors"
        save_file(tensors, os.path.join(folder, path), metadata={"format": "pt"})
        weight_map.update({k: path for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


def _block(i: int, hidden: int, intermediate: int, rand) -> dict:
    p = f"model.layers.{i}."
    out = {p + f"self_attn.{n}_proj.weight": rand(hidden, hidden) for n in "qkvo"}
    out |= {p + f"mlp.{n}_proj.weight": rand(intermediate, hidden) for n in ("gate", "up")}
    out[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
    out |= {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)}
    return out


def measure(folder: str, recipe: str, mode: str, vocab: int) -> dict:
    """Run the child; its JSON result (bytes, seconds)."""
    out = tempfile.mkdtemp(prefix="lowbit-stream-ck-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, folder, recipe, mode, out, str(vocab)], env=env,
                              capture_output=True, text=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the {mode} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=112)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--recipe", default="w2-quip")
    ap.add_argument("--in-memory", action="store_true", help="also measure the in-memory path (needs the whole model)")
    ap.add_argument("--keep", default=None, help="write the model folder here and keep it (default: a temporary one)")
    ap.add_argument("--doc", action="store_true", help="also update docs/benchmarks.md")
    args = ap.parse_args(argv)

    folder = args.keep or tempfile.mkdtemp(prefix="lowbit-stream-model-")
    try:
        t = time.perf_counter()
        weights = write_model(folder, args.layers, args.hidden, args.intermediate, args.vocab)
        print(f"wrote {weights / 1e9:.2f} GB of float32 weights to {folder} in {time.perf_counter() - t:.0f} s",
              flush=True)
        modes = ["stream"] + (["memory"] if args.in_memory else [])
        results = {}
        for mode in modes:
            results[mode] = measure(folder, args.recipe, mode, args.vocab)
            print(mode, results[mode], flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    shape = f"Llama {args.layers} x (hidden {args.hidden}, MLP {args.intermediate}), vocab {args.vocab}"
    rows = [[shape, mode, f"{weights / 2**20:.0f}", f"{r['baseline'] / 2**20:.0f}", f"{r['peak'] / 2**20:.0f}",
             f"{weights / r['peak']:.2f}", f"{r['seconds']:.0f}"] for mode, r in results.items()]
    text = [f"Peak memory of `lb.quantize(folder, {args.recipe!r}, ...)` streaming a safetensors folder block by block "
            f"({machine()}; {cpu_name()}; {load_average()}; one thread in the child). Peak = VmHWM of a fresh child "
            f"process, after imports = its VmHWM before quantizing (interpreter, torch, transformers).", "",
            markdown_table(["model", "path", "float weights MiB", "after imports MiB", "peak RSS MiB",
                            "weights / peak", "quantize s"], rows)]
    return publish("stream_memory", "\n".join(text), doc=args.doc)


if __name__ == "__main__":
    main(sys.argv[1:])
