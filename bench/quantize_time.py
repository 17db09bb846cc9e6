"""Quantization time per recipe at one thread (issue 23): all-MiniLM-L6-v2 (real weights) and SmolLM2-135M.

`lb.quantize(model, recipe, calibration)` is timed as a whole (calibration passes, the per-layer search, packing),
one recipe after the other in one process, so that the ratios to w4-quip hold on a shared machine. torch runs on
one thread; the CPU capability torch dispatches to is written beside the times (the search is GEMM-bound, so an
AVX-512 machine is faster than an AVX2 one, but the ratios between recipes move less).

- all-MiniLM-L6-v2: the calibration of bench.quality (`default_calibration`: 128 standard-library sentences).
- SmolLM2-135M-Instruct (--smollm2, lowbit_compile.hf.load_smollm2): the calibration of bench.quality_llm (32
  chunks of 256 tokens of the calibration split, in batches of 4). A whole fp4 run takes long (w4-quip alone is
  about 400 s), so --smollm2-blocks N keeps only the first N of the 30 decoder blocks and reports
  seconds × 30 / N as an extrapolation (the blocks have equal shapes; the embedding and the float head cost
  little), marked as such in the table.

    python -m bench.quantize_time [--quick] [--recipes w4-quip,fp4] [--smollm2 [--smollm2-blocks N]]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import lowbit_compile as lb

from .common import cpu_name, load_average, machine, markdown_table, publish

REFERENCE = "w4-quip"
RECIPES = ["w4-quip", "fp4", "fp4-rot", "w4a16-fp4"]
QUICK_RECIPES = ["w4-quip", "fp4"]
SMOLLM2_BLOCKS = 30  # decoder blocks of SmolLM2-135M
CALIB_CHUNKS = 32    # as bench.quality_llm


def time_recipes(model, calibration, recipes, tokenizer=None) -> dict[str, float]:
    """Seconds of lb.quantize per recipe at one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {}
        for recipe in recipes:
            t = time.perf_counter()
            lb.quantize(model, recipe, calibration, tokenizer=tokenizer, seed=0, progress=False)
            seconds[recipe] = time.perf_counter() - t
            print(f"{recipe}: {seconds[recipe]:.1f} s", flush=True)
        return seconds
    finally:
        torch.set_num_threads(threads)


def minilm_seconds(recipes) -> dict[str, float]:
    from lowbit_compile.demo import load_minilm
    from lowbit_compile.pipeline import default_calibration

    model, tok = load_minilm()
    return time_recipes(model, default_calibration(tok), recipes, tok)


def smollm2_seconds(recipes, blocks: int) -> dict[str, float]:
    """Seconds per recipe on SmolLM2-135M cut to its first `blocks` decoder blocks, times SMOLLM2_BLOCKS / blocks."""
    from lowbit_compile.evaluate import text_chunks
    from lowbit_compile.hf import load_smollm2

    loaded = load_smollm2()
    model = loaded.model
    calibration = list(text_chunks(loaded.tokenizer, "calibration", max_chunks=CALIB_CHUNKS).split(4))
    if blocks < SMOLLM2_BLOCKS:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
    seconds = time_recipes(model, calibration, recipes)
    return {r: s * SMOLLM2_BLOCKS / blocks for r, s in seconds.items()}


def rows(model: str, seconds: dict[str, float]) -> list[list]:
    ref = seconds.get(REFERENCE)
    return [[model, r, f"{s:.1f}", f"{s / ref:.2f}×" if ref else "—"] for r, s in seconds.items()]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.quantize_time", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"MiniLM, {' and '.join(QUICK_RECIPES)} only")
    ap.add_argument("--recipes", help=f"comma-separated (default: {','.join(RECIPES)})")
    ap.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M")
    ap.add_argument("--smollm2-blocks", type=int, default=SMOLLM2_BLOCKS,
                    help=f"time the first N decoder blocks only and extrapolate to {SMOLLM2_BLOCKS}")
    args = ap.parse_args(argv)
    recipes = args.recipes.split(",") if args.recipes else QUICK_RECIPES if args.quick else RECIPES
    if not 1 <= args.smollm2_blocks <= SMOLLM2_BLOCKS:
        ap.error(f"--smollm2-blocks must be in [1, {SMOLLM2_BLOCKS}]")
    load_before = load_average()
    table = rows("all-MiniLM-L6-v2", minilm_seconds(recipes))
    if args.smollm2:
        n = args.smollm2_blocks
        label = "SmolLM2-135M" if n == SMOLLM2_BLOCKS else f"SmolLM2-135M (first {n} blocks × {SMOLLM2_BLOCKS}/{n})"
        table += rows(label, smollm2_seconds(recipes, n))
    text = ["## Quantization time per recipe, one thread\n",
            f"`python -m bench.quantize_time {' '.join(argv if argv is not None else sys.argv[1:])}`. {cpu_name()}; "
            f"{machine()}; quantized at 1 thread, torch.backends.cpu.get_cpu_capability() = "
            f"{torch.backends.cpu.get_cpu_capability()}. Machine load: {load_before} at the start, {load_average()} "
            f"at the end. Seconds of the whole `lb.quantize` call (calibration included), "
            f"recipes one after the other in one process; the last column is the ratio to {REFERENCE} on the same "
            f"model.\n",
            markdown_table(["model", "recipe", "quantize s", f"vs {REFERENCE}"], table)]
    return publish("quantize_time", "\n".join(text))


if __name__ == "__main__":
    main()
