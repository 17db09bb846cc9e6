"""ExecuTorch .pte forward time in executorch.runtime: float32 against 2-bit (the packed route, unpacked in the graph
on every forward; route xnnpack-int4-load, widened to XNNPACK's int4 kernel when the program is loaded; the same
codes widened in the file) and 4-bit (XNNPACK's int4 kernel), on the benchmark Llama and the real all-MiniLM-L6-v2.

Llama: transformers LlamaConfig hidden 1024, 8 layers, MLP 2816, 16 heads, vocabulary 32000 (random weights),
1 × 16 tokens. MiniLM: 2 short sentences. Quantized: every linear except lm_head / the pooler (float32 in every
variant), data-free RTN with the randomized Hadamard (w2, w4: one scale per output channel). Static shapes.

Bits per quantized weight = 32 − 8·(fp32 file bytes − file bytes) / quantized weights (bench/export_size.py): what
the file costs per quantized weight beyond the float parts every variant shares. "load s": loading the program
and its forward method (for xnnpack-int4-load: running `lowbit_weights` and XNNPACK's packing). "forward ms":
median over interleaved rounds (the variants take turns, so load from other work on the machine falls on all
alike). "error": the exporter's check against the PyTorch quantized model.

    python -m bench.pte_latency [--quick] [--layers 8] [--rounds 15] [--variants fp32,w2-packed,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (recipe, export_pte's int4)
    "fp32": (None, "xnnpack"),
    "w2-packed": ("w2", "xnnpack"),
    "w2-load": ("w2", "xnnpack-load"),
    "w2-wide": ("w2", "xnnpack-wide"),
    "w2-rtn-load": ("w2-rtn", "xnnpack-load"),  # no rotations: what the Kronecker transforms cost
    "w3-load": ("w3", "xnnpack-load"),
    "w4": ("w4", "xnnpack"),
}
DEFAULT_VARIANTS = "fp32,w2-packed,w2-load,w2-rtn-load,w2-wide,w4"


def benchmark_llama(layers: int = 8):
    from .export_size import llama

    model, inputs, _ = llama(layers=layers, hidden=1024, mlp=2816, vocab=32000, heads=16)
    return model, inputs


def benchmark_minilm():
    from .export_size import minilm

    model, inputs, _ = minilm()
    return model, inputs


def measure(label: str, model, inputs, variants: list[str], rounds: int, out: Path) -> list[list]:
    from lowbit_compile.export.executorch import export_pte, load_pte_method
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    from .common import time_interleaved
    from .export_size import quantized_linears, recipe_bits

    lins = quantized_linears(model)
    n = sum(m.weight.numel() for m in lins.values())
    exported, methods = {}, {}
    for name in variants:
        recipe, int4 = VARIANTS[name]
        records = {} if recipe is None else {k: quantize_weight(k, m.weight, parse_spec(recipe), seed=0)
                                             for k, m in lins.items()}
        t = time.perf_counter()
        res = export_pte(model, records, inputs, out / f"{label}-{name}.pte", dynamic_shapes=None, int4=int4)
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        methods[name] = load_pte_method(res.path)
        exported[name] = (res, records, export_s, time.perf_counter() - t)
        print(f"{label} {name}: {res.nbytes:,} bytes, export {export_s:.0f} s", flush=True)
    args = [t for t in inputs if isinstance(t, torch.Tensor)]
    ms = {k: v * 1e3 for k, v in time_interleaved({k: (lambda m=m: m.execute(args)) for k, m in methods.items()},
                                                   rounds=rounds, warmup=2).items()}
    fp32_bytes = exported["fp32"][0].nbytes if "fp32" in exported else None
    base = ms.get("fp32")
    rows = []
    for name, (res, records, export_s, load_s) in exported.items():
        bits = "" if fp32_bytes is None else f"{32 - 8 * (fp32_bytes - res.nbytes) / n:.2f}"
        routes = "/".join(sorted(set(res.routes.values()))) or "float"
        rows.append([label, name, routes, f"{res.nbytes / 2**20:.1f}", bits,
                     recipe_bits(records, n) if records else "32", "" if res.error is None else f"{res.error:.1e}",
                     f"{load_s:.2f}", f"{ms[name]:.1f}", "" if base is None else f"{ms[name] / base:.2f}",
                     f"{export_s:.0f}"])
    return rows, n


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer benchmark Llama only, fewer rounds")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the benchmark Llama")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--models", default="llama,minilm", help="comma-separated, from llama, minilm")
    ap.add_argument("--threads", type=int, default=1, help="threads of ExecuTorch's pool (XNNPACK); default 1, as "
                    "torch here: on a shared machine a second thread that waits on other work stalls every op")
    args = ap.parse_args(argv)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)

    from .common import machine, markdown_table, publish

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    layers = 2 if args.quick else args.layers
    rounds = 5 if args.quick else args.rounds
    builders = {"llama": (f"llama-1024x2816x{layers}", lambda: benchmark_llama(layers)),
                "minilm": ("all-MiniLM-L6-v2", benchmark_minilm)}
    names = ["llama"] if args.quick else args.models.split(",")
    if set(names) - set(builders):
        ap.error(f"unknown models {sorted(set(names) - set(builders))}: choose from {list(builders)}")
    models = [builders[m] for m in names]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in models:
            model, inputs = build()
            r, n = measure(label, model, inputs, variants, rounds, Path(tmp))
            rows += r
            notes.append(f"{label}: {n / 1e6:.1f} M quantized weights")
    header = ["model", "variant", "routes", "MiB", "bits / quantized weight", "recipe bits", "error", "load s",
              "forward ms", "× fp32", "export s"]
    text = "\n".join([
        "## ExecuTorch .pte forward time\n",
        f"Machine: {machine()}; ExecuTorch threadpool {portable_lib._threadpool_get_thread_count()} thread(s). "
        f"executorch.runtime (XNNPACK delegate, portable kernels), static shapes; Llama 1 × 16 "
        f"tokens, MiniLM 2 sentences; forward ms: median of {rounds} interleaved rounds after 2 warm-up calls "
        f"({'; '.join(notes)}).\n",
        "Variants: fp32; w2-packed (2-bit codes unpacked in the graph on every forward, int4='xnnpack'); w2-load "
        "(route xnnpack-int4-load, int4='xnnpack-load': 2-bit codes in the file, widened to XNNPACK's int4 kernel "
        "at load); w2-wide (int4='xnnpack-wide': the same codes stored as 4 bits); w2-rtn-load (no rotations); "
        "w3-load; w4 (xnnpack-int4).\n",
        markdown_table(header, rows),
    ])
    return publish("pte_latency", text)


if __name__ == "__main__":
    main()
