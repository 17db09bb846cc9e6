"""Layer-wise mixed precision on the real all-MiniLM-L6-v2: LayerwiseQuant's block orderings, and the budget
solver against uniform formats.

Every linear is quantized once at 2, 3 and 4 bits (QuIP, non-sequential calibration: each block's Hessians
come from the float model) by mixed.measure. (a) LayerwiseQuant: move 0-100% of the 6 blocks from 4 to 2 bits
in LIM order, ZD order (both directions), reverse LIM order and random orders; each configuration mixes those
records, so the mix is non-sequential (no block is re-quantized on inputs from quantized blocks above it).
To keep 50+ configurations affordable on 2 cores, a mix is evaluated by loading each record's dequantized
weight into the float model's linear (the weight LowbitLinear applies); two mixes are also run through
lb.swap_linears (LowbitLinear, the lowbit::rotated_linear op) and the difference is reported.
(b) The solver at 2.5 / 3.0 / 3.25 bits per weight (unit = linear and block, three loss definitions), first as
the same non-sequential mix, then the real pipeline: pipeline.quantize_mixed, i.e. lb.quantize with the plan and
sequential calibration, against uniform lb.quantize runs.

Metric: mean cosine similarity of sentence embeddings to the float model on 64 held-out sentences (bench.common).
Bits per weight as stored over all linears (codes + float16 scales + sign bits).

    python -m bench.mixed_precision [--quick]     (--quick: no sequential runs)
"""

from __future__ import annotations

import argparse
import os
import random
import time

import lowbit_compile as lb
from lowbit_compile.mixed import measure, plan_from
from lowbit_compile.pipeline import default_calibration, quantize_mixed
from lowbit_compile.plot import plot_curves

from .common import OUT, cosine_to_float, machine, markdown_table, minilm_eval, publish

CANDIDATES = ("w2-quip", "w3-quip", "w4-quip")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = (2.5, 3.0, 3.25)


def mix(meas, choice: dict) -> tuple[dict, float]:
    """(records for swap_linears, bits per weight) of a per-linear choice of candidates."""
    records = {f: meas.records[(f, c)] for f, c in choice.items()}
    bits = sum(meas.linears[f].results[c].bits for f, c in choice.items())
    return records, bits / sum(meas.linears[f].weights for f in choice)


_DEQUANTIZED: dict = {}


def evaluate(model, held, ref, records) -> float:
    """Cosine to float with each record's dequantized weight in place of the float weight (restored after)."""
    saved = {}
    try:
        for f, rec in records.items():
            lin = model.get_submodule(f)
            saved[f] = lin.weight.data
            key = (f, id(rec))
            if key not in _DEQUANTIZED:
                _DEQUANTIZED[key] = (rec, rec.dequantized_weight().to(saved[f].dtype))
            lin.weight.data = _DEQUANTIZED[key][1]
        return cosine_to_float(model, held, ref)
    finally:
        for f, w in saved.items():
            model.get_submodule(f).weight.data = w


def evaluate_swapped(model, held, ref, records) -> float:
    """The same through lb.swap_linears: LowbitLinear modules running lowbit::rotated_linear."""
    return cosine_to_float(lb.swap_linears(model, records), held, ref)


def block_orders(meas) -> dict[str, list[str]]:
    """Blocks in the order they move to 2 bits: least important first."""
    lim, zd = meas.lim, meas.zd
    orders = {
        "LIM (high LIM = important)": sorted(lim, key=lim.get),
        "reverse LIM": sorted(lim, key=lim.get, reverse=True),
        "ZD (high ZD = important)": sorted(zd, key=zd.get),
        "ZD (low ZD = important)": sorted(zd, key=zd.get, reverse=True),
    }
    for seed in range(3):
        blocks = list(lim)
        random.Random(seed).shuffle(blocks)
        orders[f"random (seed {seed})"] = blocks
    return orders


def layerwise_experiment(model, held, ref, meas):
    """Cosine per order and fraction of blocks moved from 4 to 2 bits (linears outside blocks stay at 4)."""
    results = {}
    for name, order in block_orders(meas).items():
        row = []
        for frac in FRACTIONS:
            moved = set(order[:int(frac * len(order) + 0.5)])
            choice = {f: "w2-quip" if i.block in moved else "w4-quip" for f, i in meas.linears.items()}
            records, bpw = mix(meas, choice)
            row.append((len(moved), bpw, evaluate(model, held, ref, records)))
        results[name] = row
        print(name, [f"{c:.4f}" for _, _, c in row], flush=True)
    return results


def solver_experiment(model, held, ref, meas):
    rows, plans = [], {}
    for unit in ("linear", "block"):
        for loss in (("output", "proxy", "relative") if unit == "linear" else ("output",)):
            for t in TARGETS:
                plan, report = plan_from(meas, t, unit, loss)
                choice = {r["fqn"]: r["format"] for r in report.rows}
                records, bpw = mix(meas, choice)
                cos = evaluate(model, held, ref, records)
                counts = {c: sum(1 for v in choice.values() if v == c) for c in CANDIDATES}
                rows.append([f"{t}", unit, loss, f"{bpw:.4f}", f"{cos:.4f}",
                             " / ".join(str(counts[c]) for c in CANDIDATES)])
                plans[(t, unit, loss)] = report
                print(rows[-1], flush=True)
    uniform = {}
    for c in CANDIDATES:
        records, bpw = mix(meas, dict.fromkeys(meas.linears, c))
        uniform[c] = (bpw, evaluate(model, held, ref, records))
        rows.append(["uniform", "-", "-", f"{bpw:.4f}", f"{uniform[c][1]:.4f}", c])
    return rows, plans, uniform


def sequential_runs(model, tok, held, ref, calib, meas):
    rows, got = [], {}
    for recipe in ("w3-optq", "w3-quip", "w4-quip"):
        t0 = time.perf_counter()
        ck = lb.quantize(model, recipe, calib, tokenizer=tok, progress=False)
        got[recipe] = (ck.bits_per_weight(), evaluate(model, held, ref, ck.records))
        rows.append([recipe, f"{got[recipe][0]:.4f}", f"{got[recipe][1]:.4f}", f"{time.perf_counter() - t0:.0f}"])
        print(rows[-1], flush=True)
    for t in TARGETS:
        t0 = time.perf_counter()
        ck = quantize_mixed(model, calib, t, CANDIDATES, "linear", measurements=meas, progress=False,
                            report_path=os.path.join(OUT, f"mixed_plan_{t}bpw.md"))
        got[t] = (ck.bits_per_weight(), evaluate(model, held, ref, ck.records))
        rows.append([f"mixed {t} bpw (unit=linear, loss=output)", f"{got[t][0]:.4f}", f"{got[t][1]:.4f}",
                     f"{time.perf_counter() - t0:.0f} (+ measure)"])
        print(rows[-1], flush=True)
    return rows, got


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the sequential lb.quantize runs")
    args = ap.parse_args(argv)
    model, tok, held, ref = minilm_eval()
    calib = default_calibration(tok)
    t0 = time.perf_counter()
    meas = measure(model, calib, CANDIDATES, keep_records=True, progress=False)
    measure_s = time.perf_counter() - t0
    print(f"measure: {measure_s:.0f} s; LIM {meas.lim}; ZD {meas.zd}", flush=True)

    lw = layerwise_experiment(model, held, ref, meas)
    plot_curves({name: ([frac for frac in FRACTIONS], [c for _, _, c in row]) for name, row in lw.items()},
                os.path.join(OUT, "mixed_layerwise.png"), "fraction of blocks moved from 4 to 2 bits",
                "cosine to float", "LayerwiseQuant on all-MiniLM-L6-v2 (QuIP records, non-sequential mix)")
    solver_rows, plans, uniform = solver_experiment(model, held, ref, meas)
    checks = []
    for label, choice in [("uniform w2-quip", dict.fromkeys(meas.linears, "w2-quip")),
                          ("solver 2.5 bpw", {r["fqn"]: r["format"] for r in plans[(2.5, "linear", "output")].rows})]:
        records, _ = mix(meas, choice)
        checks.append((label, evaluate(model, held, ref, records), evaluate_swapped(model, held, ref, records)))
        print("check", checks[-1], flush=True)
    plans[(2.5, "linear", "output")].plot(os.path.join(OUT, "mixed_plan_2.5bpw.png"))
    curves = {f"solver, unit={u}": ([float(r[3]) for r in solver_rows if r[1] == u and r[2] == "output"],
                                    [float(r[4]) for r in solver_rows if r[1] == u and r[2] == "output"])
              for u in ("linear", "block")}
    curves["uniform QuIP"] = ([b for b, _ in uniform.values()], [c for _, c in uniform.values()])
    curves = {f"{k} (non-sequential mix)": v for k, v in curves.items()}

    text = [
        "## Mixed precision on all-MiniLM-L6-v2\n", f"Machine: {machine()}.\n",
        f"Phase 1 (every linear at {', '.join(CANDIDATES)}, non-sequential, plus LIM, ZD and output "
        f"sensitivities): {measure_s:.0f} s.\n",
        "Block scores: " + ", ".join(f"{b.rsplit('.', 1)[-1]}: LIM {meas.lim[b]:.3f} / ZD {meas.zd[b]:.4f}"
                                     for b in meas.lim) + "\n",
        "### (a) LayerwiseQuant: blocks moved from 4 to 2 bits, least important first (non-sequential mix)\n",
        markdown_table(["order"] + [f"{int(f * 100)}% ({lw['reverse LIM'][i][0]} blocks, "
                                    f"{lw['reverse LIM'][i][1]:.2f} bpw)" for i, f in enumerate(FRACTIONS)]
                       + ["mean"],
                       [[name] + [f"{c:.4f}" for _, _, c in row] + [f"{sum(c for *_, c in row) / len(row):.4f}"]
                        for name, row in lw.items()]),
        "\n### (b) Budget solver (non-sequential mix of the phase-1 records)\n",
        markdown_table(["target bpw", "unit", "loss", "bits/weight (stored)", "cosine to float",
                        "linears at " + " / ".join(CANDIDATES)], solver_rows),
        "\nMixes evaluated with dequantized weights; through lb.swap_linears instead: "
        + "; ".join(f"{label} {a:.5f} vs {b:.5f}" for label, a, b in checks) + ".",
    ]
    if not args.quick:
        seq_rows, got = sequential_runs(model, tok, held, ref, calib, meas)
        curves["uniform QuIP, sequential"] = ([got["w3-quip"][0], got["w4-quip"][0]],
                                              [got["w3-quip"][1], got["w4-quip"][1]])
        curves["solver, unit=linear, sequential"] = ([got[t][0] for t in TARGETS], [got[t][1] for t in TARGETS])
        text += ["\n### (b) The real pipeline: lb.quantize, sequential calibration\n",
                 markdown_table(["recipe", "bits/weight (stored)", "cosine to float", "seconds"], seq_rows),
                 f"\nGoal 1, 2.5 bpw mixed {got[2.5][1]:.4f} vs uniform w3-optq {got['w3-optq'][1]:.4f}: "
                 f"{'met' if got[2.5][1] > got['w3-optq'][1] else 'NOT met'}.",
                 f"Goal 2, 3.25 bpw mixed {got[3.25][1]:.4f} vs uniform w4-quip {got['w4-quip'][1]:.4f} "
                 f"(gap {got['w4-quip'][1] - got[3.25][1]:.4f}, goal ≤ 0.005): "
                 f"{'met' if got['w4-quip'][1] - got[3.25][1] <= 0.005 else 'NOT met'}."]
    plot_curves({k: v for k, v in curves.items() if v[0]}, os.path.join(OUT, "mixed_solver.png"),
                "bits per weight (stored)", "cosine to float", "budget solver vs uniform QuIP, all-MiniLM-L6-v2")
    return publish("mixed_precision", "\n".join(text))


if __name__ == "__main__":
    main()
