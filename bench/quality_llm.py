"""Quality on a real decoder LLM: SmolLM2-135M-Instruct (lowbit_compile.hf.load_smollm2), every method and bit
width, perplexity and KL to the float model, bits per weight as stored, quantize time.

Reference: the float32 model transformers dequantizes from the GGUF file's Q4_1 weights (4-bit, blocks of 32 with
scale and minimum). A block-32 asymmetric 4-bit quantizer could copy those weights nearly exactly, so 4-bit rows in
such a format (torchao int4 group 32 below is symmetric, not that format) would flatter themselves; per-channel
and group-128 formats and every 2/3-bit format lose real quality against it.

Text (evaluate.py): held-out standard-library docstring sentences as one running text, 17 chunks of 256 tokens
(4335 predicted tokens); calibration: 32 chunks of 256 tokens of the disjoint calibration split. Per row: bits
per weight over the quantized linears as stored (codes + scales + sign bits; torchao: codes + one float32 scale per
group of 32), perplexity (float's in the header), its ratio to float's, mean per-token KL(float ‖ quantized) in
nats, top-1 agreement, and lb.quantize's wall time (one thread unless --threads; the machine may be shared:
`load` is recorded). The output head stays float (the tied embedding too) in every row, as the recipes default.

Each row is stored in bench-out/quality_llm.json as it finishes; a rerun skips rows already there (delete the
file, or --fresh, to measure again).

    python -m bench.quality_llm [--quick] [--only RECIPE ...] [--threads N] [--fresh] [--table-only] [--calib-order K]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .common import OUT, load_average, machine, markdown_table, publish, versions

EVAL_CHUNKS = 17
CALIB_CHUNKS = 32
ROWS = [  # (label, recipe or ("torchao", bits))
    ("RTN", "w2-rtn"), ("RTN + incoherence", "w2"), ("OPTQ", "w2-optq"), ("QuIP", "w2-quip"),
    ("torchao IntxWeightOnly g32", ("torchao", 2)),
    ("RTN", "w3-rtn"), ("RTN + incoherence", "w3"), ("OPTQ", "w3-optq"), ("QuIP", "w3-quip"),
    ("torchao IntxWeightOnly g32", ("torchao", 3)),
    ("RTN", "w4-rtn"), ("RTN + incoherence", "w4"), ("OPTQ", "w4-optq"), ("QuIP", "w4-quip"),
    ("torchao IntxWeightOnly g32", ("torchao", 4)),
    ("mixed (QuIP 2/3/4)", "2.5bpw"), ("mixed (QuIP 2/3/4)", "3.25bpw"),
    ("LLM-FP4 W4A16", "w4a16-fp4"), ("LLM-FP4 W4A4", "fp4"), ("LLM-FP4 W4A4 + rotation", "fp4-rot"),
    ("E8 lattice codebook (QuIP#)", "w2-e8"), ("E8 + block fine-tuning", "w2-e8-ft"), ("E8 + residual", "w3-e8"),
    ("E8 + residual + block fine-tuning", "w3-e8-ft"),
]
QUICK = ["w2-rtn", "w2-quip"]


def _key(recipe) -> str:
    return recipe if isinstance(recipe, str) else f"torchao-int{recipe[1]}-g32"


def _torchao(model, bits: int):
    """A copy of the model with torchao's IntxWeightOnlyConfig(int{bits}, PerGroup(32)) on every block linear (the
    head and the tied embedding stay float, as in the other rows). Returns (model, bits per weight, seconds)."""
    import copy

    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    q = copy.deepcopy(model)
    t = time.perf_counter()
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(32))
    quantize_(q, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    return q, bits + 32 / 32, time.perf_counter() - t


def _qbits(ck) -> float:
    n = sum(r.in_features * r.out_features for r in ck.records.values())
    return sum(r.bits_per_weight() * r.in_features * r.out_features for r in ck.records.values()) / n


def run_row(loaded, recipe, calib, chunks) -> dict:
    import lowbit_compile as lb
    from lowbit_compile.evaluate import causal_lm_quality

    model = loaded.model
    if isinstance(recipe, str):
        t = time.perf_counter()
        ck = lb.quantize(model, recipe, calib, progress=False)
        seconds = time.perf_counter() - t
        q, bpw = lb.swap_linears(model, ck.records), _qbits(ck)
    else:
        q, bpw, seconds = _torchao(model, recipe[1])
    res = causal_lm_quality(model, q, chunks)
    return {**res, "bits": bpw, "seconds": seconds, "load": load_average()}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"rows {QUICK} on 4 evaluation chunks, not saved")
    ap.add_argument("--only", nargs="*", default=None, help="recipes (or torchao-int2-g32, ...) to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="forget the stored rows")
    ap.add_argument("--table-only", action="store_true", help="publish the stored rows (docs included), run none")
    ap.add_argument("--calib-order", default="0",
                    help="'reverse', or K: the calibration batches rotated by K (how much a recipe's figure moves with "
                         "an equally good calibration set); rows of another order than 0 are printed, not stored")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowbit_compile.evaluate import text_chunks
    from lowbit_compile.hf import load_smollm2

    loaded = load_smollm2()
    chunks = text_chunks(loaded.tokenizer, "heldout", max_chunks=4 if args.quick else EVAL_CHUNKS,
                         min_tokens=1000 if args.quick else 4096)
    calib = list(text_chunks(loaded.tokenizer, "calibration", max_chunks=CALIB_CHUNKS).split(4))
    reordered = args.calib_order != "0"
    if args.calib_order == "reverse":
        calib = calib[::-1]
    elif reordered:
        k = int(args.calib_order) % len(calib)
        calib = calib[k:] + calib[:k]
    scratch = args.quick or reordered
    store = os.path.join(OUT, "quality_llm.json")
    done = {} if (args.fresh or scratch or not os.path.exists(store)) else json.load(open(store))
    todo = [r for _, r in ROWS if (_key(r) in QUICK if args.quick else args.only is None or _key(r) in args.only)]
    for recipe in todo:
        key = _key(recipe)
        if key in done or args.table_only:
            continue
        print(f"{key}: quantizing and evaluating ...", flush=True)
        done[key] = run_row(loaded, recipe, calib, chunks)
        print(f"{key}: {done[key]}", flush=True)
        if not scratch:
            os.makedirs(OUT, exist_ok=True)
            with open(store, "w") as f:
                json.dump(done, f, indent=1)
    table, ppl_f = [], None
    for label, recipe in ROWS:
        r = done.get(_key(recipe))
        if r is None:
            continue
        ppl_f = r["perplexity_float"]
        table.append([label, f"`{_key(recipe)}`", f"{r['bits']:.3f}", f"{r['perplexity_quantized']:.2f}",
                      f"{r['perplexity_quantized'] / r['perplexity_float']:.3f}", f"{r['kl']:.4f}",
                      f"{r['top1_agreement']:.3f}", f"{r['seconds']:.0f}"])
    text = ["## Quality on a real LLM: SmolLM2-135M-Instruct (perplexity, KL to float)\n",
            f"`python -m bench.quality_llm`. {machine()}; {versions()}. Held-out text: {len(chunks)} chunks × "
            f"{chunks.shape[1]} tokens of standard-library docstrings ({len(chunks) * (chunks.shape[1] - 1)} predicted "
            f"tokens); calibration: {CALIB_CHUNKS} × 256 tokens of the disjoint calibration split. Float perplexity: "
            f"{ppl_f:.2f}. Reference: the float32 model dequantized from the GGUF's Q4_1 weights (block-32 asymmetric "
            f"4-bit; no row here uses that format). Quantize time at {args.threads} thread(s) on a shared machine.\n",
            markdown_table(["method", "recipe", "bits/weight (stored)", "perplexity", "vs float", "KL (nats/token)",
                            "top-1 agreement", "quantize s"], table)]
    missing = [_key(r) for _, r in ROWS if _key(r) not in done]
    if missing and not scratch:
        text.append(f"\nNot measured yet: {', '.join(missing)} (`python -m bench.quality_llm --only ...` adds them).")
    if reordered:
        text.append(f"\nCalibration batches in order {args.calib_order!r} (not the benchmark's).")
        print("\n".join(text))
        return "\n".join(text)
    return publish("quality_llm", "\n".join(text), doc=not args.quick and args.only is None)


if __name__ == "__main__":
    main()
