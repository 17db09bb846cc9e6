"""LLM-FP4 quality on the real all-MiniLM-L6-v2: FP4 W4A4 (format/clip search + per-channel activation
exponents folded into the producers) against MinMax E2M1 W4A4, INT4 W4A4 and FP4 W4A16.

Same metric as bench/quality.py: mean cosine similarity between the quantized and the float model's sentence
embeddings (mean pooling, L2 normalized) on 64 held-out standard-library sentences; calibration: 128 other
sentences (`default_calibration`). Every linear is quantized (the 36 block linears and the pooler).

- FP4 W4A4 rows run through torch.compile(backend="lowbit", options={"checkpoint": ...}) (eager compiler), so
  the activation exponents are folded in the graph (passes/fold_act_scales.py); the row also checks that the
  folded graph gives the very same embeddings as the swapped modules with run-time shifts.
- INT4 W4A4 is simulated: int4 weights as `w4-rtn` (per-channel scale with a clipping search, no incoherence)
  and activations rounded per tensor to the symmetric int4 grid (-7..7) at a static scale from the float
  calibration max (MinMax), the integer analogue of the MinMax E2M1 row.

    python -m bench.quality_fp4 [--only TEXT]

Levers reported: the search (vs MinMax E2M1), per-channel exponents (vs none), and the randomized Hadamard
rotation (fp4-rot: rotations flatten the activation outliers that per-channel exponents otherwise absorb).

`fp4_rows(...)` returns the table rows so that bench/quality.py can add them to its report.
"""

from __future__ import annotations

import contextlib
import time

import torch

import lowbit_compile as lb
from lowbit_compile.demo import embed
from lowbit_compile.pipeline import default_calibration
from lowbit_compile.recipe import LayerSpec, Recipe

HEADER = ["variant", "bits/weight (stored)", "cosine to float", "quantize s", "notes"]


def _fp4(name: str, **kw) -> Recipe:
    return Recipe(name=name, default=LayerSpec(**{"bits": 4, "method": "fp4", "rotate": False, **kw}))


def _qbits(records) -> float:
    n = sum(r.in_features * r.out_features for r in records.values())
    return sum(r.bits_per_weight() * r.in_features * r.out_features for r in records.values()) / n


@contextlib.contextmanager
def _threads(n: int | None):
    """The FP4 search is many small tensor ops: on a shared, loaded CPU extra OpenMP threads mostly spin."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cos(emb, ref) -> float:
    return float((emb * ref).sum(-1).mean())


def _fp4_row(model, tok, held, ref, calib, label, recipe, compiled: bool):
    t = time.perf_counter()
    ck = lb.quantize(model, recipe, calib, tokenizer=tok, progress=False)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        swapped = embed(lb.swap_linears(model, ck.records), held)
        notes = ""
        if compiled:
            torch._dynamo.reset()
            fast = torch.compile(model, backend="lowbit", options={"checkpoint": ck, "compiler": "eager"})
            emb = embed(fast, held)
            report = lb.last_report()
            folded = sum("folded into" in n for n in report.notes)
            kept = sum("kept as a run-time shift" in n for n in report.notes)
            notes = (f"{folded} layers folded, {kept} with a run-time shift; folded == unfolded: "
                     f"{torch.equal(emb, swapped)}")
            torch._dynamo.reset()
        else:
            emb = swapped
    formats = sorted({r.fmt for r in ck.records.values()})
    notes = "; ".join(x for x in (notes, f"{len(formats)} format pairs used") if x)
    return [label, f"{_qbits(ck.records):.3f}", f"{_cos(emb, ref):.4f}", f"{seconds:.1f}", notes]


def _int4_w4a4_row(model, tok, held, ref, calib):
    """w4-rtn weights + static per-tensor symmetric int4 activations at the calibration max."""
    t = time.perf_counter()
    ck = lb.quantize(model, "w4-rtn", progress=False)
    amax: dict[str, float] = {}
    hooks = []
    for fqn in ck.records:
        def hook(mod, args, fqn=fqn):
            amax[fqn] = max(amax.get(fqn, 0.0), float(args[0].abs().max()))
        hooks.append(model.get_submodule(fqn).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in calib:
            model(**b)
    for h in hooks:
        h.remove()
    qmodel = lb.swap_linears(model, ck.records)
    for fqn in ck.records:
        scale = max(amax[fqn], 1e-12) / 7

        def fake_int4(mod, args, scale=scale):
            return (torch.clamp(torch.round(args[0] / scale), -7, 7) * scale,)
        qmodel.get_submodule(fqn).register_forward_pre_hook(fake_int4)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        emb = embed(qmodel, held)
    return ["INT4 W4A4 (RTN weights, MinMax per-tensor int4 activations, simulated)", f"{_qbits(ck.records):.3f}",
            f"{_cos(emb, ref):.4f}", f"{seconds:.1f}", "weights stored as w4-rtn"]


def fp4_rows(model, tok, held, ref, calib, threads: int | None = 1, only: str = "") -> list[list[str]]:
    """Rows for the FP4 table (see HEADER); `only` keeps the variants whose label contains it. Each searched
    W4A4 row takes minutes on a CPU core."""
    variants = [
        ("FP4 W4A4: search + per-channel exponents + fold (recipe fp4)", Recipe.parse("fp4"), True),
        ("FP4 W4A4: search + Hadamard rotation, no exponents (recipe fp4-rot)", Recipe.parse("fp4-rot"), True),
        ("FP4 W4A4: search + Hadamard rotation + exponents (run-time shift)",
         _fp4("fp4 rot + exponents", rotate=True), True),
        ("FP4 W4A4: search, no exponents", _fp4("fp4 no exponents", act_exponents=False), False),
        ("FP4 W4A4: MinMax E2M1 (no search)", _fp4("fp4 minmax", fp4_search=False), False),
        ("INT4 W4A4 (RTN weights, MinMax per-tensor int4 activations, simulated)", None, False),
        ("FP4 W4A16: search (recipe w4a16-fp4)", Recipe.parse("w4a16-fp4"), False),
    ]
    rows = []
    with _threads(threads):
        for label, recipe, compiled in variants:
            if only and only not in label:
                continue
            if recipe is None:
                rows.append(_int4_w4a4_row(model, tok, held, ref, calib))
            else:
                rows.append(_fp4_row(model, tok, held, ref, calib, label, recipe, compiled))
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> str:
    import argparse

    from .common import machine, markdown_table, minilm_eval, publish

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="run only the variants whose label contains this text")
    args = ap.parse_args(argv)
    model, tok, held, ref = minilm_eval()
    calib = default_calibration(tok)
    rows = fp4_rows(model, tok, held, ref, calib, only=args.only)
    out = "\n".join(["## FP4 (LLM-FP4) on all-MiniLM-L6-v2\n", f"Machine: {machine()}; FP4 search on 1 thread.\n",
                     markdown_table(HEADER, rows)])
    return publish("quality_fp4", out)


if __name__ == "__main__":
    main()
