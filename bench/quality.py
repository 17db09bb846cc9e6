"""Quality of RTN, OPTQ, QuIP and E8 (QuIP#'s lattice codebook) at 2/3/4 bits on the real all-MiniLM-L6-v2,
and quantization time.

Metric: mean cosine similarity between the quantized and the float model's sentence embeddings (mean pooling,
L2 normalized) on 64 held-out standard-library sentences; calibration: 128 other sentences (disjoint split).
Bits per weight are counted as stored over all linear weights: packed codes + float16 scales + sign bits.

    python -m bench.quality [--quick]
    python -m bench.quality --recipes w2-quip,w2-e8,w2-e8-ft   # only these recipes (bench-out/quality-recipes.md)
    python -m bench.quality --recipes 2.5bpw:w2-e8-ft/w3-e8-ft/w4-e8-ft   # mixed precision over these candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import lowbit_compile as lb
from lowbit_compile.pipeline import default_calibration
from lowbit_compile.recipe import Recipe, parse_spec

from .common import cosine_to_float, machine, markdown_table, minilm_eval, publish

METHODS = [
    ("RTN", "w{b}-rtn"),
    ("RTN + incoherence", "w{b}"),
    ("OPTQ", "w{b}-optq"),
    ("QuIP", "w{b}-quip"),
    ("E8 (QuIP# E8P, block LDLQ)", "w{b}-e8"),
]


def run_one(model, tok, held, ref, calib, recipe, sequential=True):
    """One recipe string, or "TARGETbpw:cand1/cand2/..." for pipeline.quantize_mixed with those candidates."""
    from lowbit_compile.pipeline import quantize_mixed

    t = time.perf_counter()
    if ":" in recipe:
        target, cands = recipe.split(":")
        ck = quantize_mixed(model, calib, float(target.removesuffix("bpw")), cands.split("/"), tokenizer=tok,
                            seed=0, progress=False)
    else:
        ck = lb.quantize(model, recipe, calib, tokenizer=tok, sequential=sequential, progress=False)
    seconds = time.perf_counter() - t
    cos = cosine_to_float(lb.swap_linears(model, ck.records), held, ref)
    return cos, _qbits(ck), seconds


def recipe_rows(model, tok, held, ref, calib, recipes) -> str:
    rows = []
    for recipe in recipes:
        cos, bpw, sec = run_one(model, tok, held, ref, calib, recipe.strip())
        rows.append([recipe.strip(), f"{bpw:.3f}", f"{cos:.4f}", f"{sec:.1f}"])
        print(rows[-1], flush=True)
    text = ["## Quality of chosen recipes on all-MiniLM-L6-v2\n", f"Machine: {machine()}.\n",
            markdown_table(["recipe", "bits/weight (stored)", "cosine to float", "quantize s"], rows)]
    return publish("quality-recipes", "\n".join(text))


def _qbits(ck) -> float:
    """Bits per weight over the quantized linears (the pooler and every block linear here)."""
    n = sum(r.in_features * r.out_features for r in ck.records.values())
    return sum(r.bits_per_weight() * r.in_features * r.out_features for r in ck.records.values()) / n


def quip_levers(bits: int, **changes) -> Recipe:
    spec = dataclasses.replace(parse_spec(f"w{bits}-quip"), **changes)
    return Recipe(name=f"w{bits}-quip " + ",".join(f"{k}={v}" for k, v in changes.items()), default=spec)


def big_layer_seconds(bits: int = 2, out_f: int = 4096, in_f: int = 11008) -> float:
    from lowbit_compile.quantize.quip import quantize_quip

    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(2 * in_f, in_f, generator=g, dtype=torch.float32)
    h = (x.T.double() @ x.double()) / x.shape[0]
    t = time.perf_counter()
    quantize_quip(w, h, bits, fqn="bench.big")
    return time.perf_counter() - t


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 bits only, no levers, no big layer, no FP4")
    ap.add_argument("--recipes", help="comma-separated recipe strings: run only these (e.g. w2-quip,w2-e8)")
    args = ap.parse_args(argv)
    model, tok, held, ref = minilm_eval()
    calib = default_calibration(tok)
    if args.recipes:
        return recipe_rows(model, tok, held, ref, calib, args.recipes.split(","))
    bits_list = [2] if args.quick else [2, 3, 4]
    rows = []
    for b in bits_list:
        for name, pattern in METHODS:
            cos, bpw, sec = run_one(model, tok, held, ref, calib, pattern.format(b=b))
            rows.append([f"{b}", name, f"{bpw:.3f}", f"{cos:.4f}", f"{sec:.1f}"])
            print(rows[-1], flush=True)
    text = ["## Quality: RTN vs OPTQ vs QuIP on all-MiniLM-L6-v2\n", f"Machine: {machine()}.\n",
            markdown_table(["bits", "method", "bits/weight (stored)", "cosine to float", "quantize s"], rows)]
    if not args.quick:
        lever_rows = []
        for label, recipe, seq in [
            ("QuIP (default: sequential, scale search on proxy loss)", "w2-quip", True),
            ("QuIP, non-sequential calibration", "w2-quip", False),
            ("QuIP + 2 greedy passes", quip_levers(2, greedy=2), True),
            ("QuIP + diagonal rescaling", quip_levers(2, rescale=True), True),
        ]:
            cos, bpw, sec = run_one(model, tok, held, ref, calib, recipe, sequential=seq)
            lever_rows.append([label, f"{cos:.4f}", f"{sec:.1f}"])
            print(lever_rows[-1], flush=True)
        text += ["\n### Levers at 2 bits\n", markdown_table(["variant", "cosine to float", "quantize s"],
                                                             lever_rows)]
        sec = big_layer_seconds()
        text.append(f"\nOne 4096×11008 linear (random SPD Hessian), QuIP 2-bit with scale search: {sec:.1f} s.")
        print("big layer", sec, flush=True)
        from .quality_fp4 import HEADER, fp4_rows  # LLM-FP4 rows (issue 11): W4A4 / W4A16 variants

        text += ["\n### FP4 (LLM-FP4)\n", markdown_table(HEADER, fp4_rows(model, tok, held, ref, calib))]
    return publish("quality", "\n".join(text))


if __name__ == "__main__":
    main()
