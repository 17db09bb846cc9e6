"""A/B the FP4 search on real layers: capture the inputs of every FP4 group of a model once, then run the search of
two commits on the very same inputs and compare time, chosen formats and the layers' output error.

    # once: the groups' inputs (weights, the calibration sample, maxima) of MiniLM or SmolLM2 under the fp4 recipe
    OMP_NUM_THREADS=1 python tools/fp4_search_ab.py capture minilm groups-minilm.pt
    OMP_NUM_THREADS=1 python tools/fp4_search_ab.py capture smollm2 groups-smollm2.pt --every 3   # every 3rd block
    # on each commit: the lowbit_compile imported is the first on sys.path, so name the checkout to measure
    PYTHONPATH=<checkout of A> OMP_NUM_THREADS=1 python tools/fp4_search_ab.py run groups-minilm.pt fp4-rot A.json
    PYTHONPATH=<checkout of B> OMP_NUM_THREADS=1 python tools/fp4_search_ab.py run groups-minilm.pt fp4-rot B.json
    python tools/fp4_search_ab.py compare A.json B.json

The capture runs lb.quantize with a shortened search (11 clip values, one round) so that it is quick; the inputs of
later blocks then come from that quick search's quantized layers, which is all an A/B needs (both sides see the same
inputs). `run` calls quantize.layer.quantize_fp4_group per group with the recipe's layer spec (fp4, fp4-rot or
w4a16-fp4) and records, per layer, the formats, the output error relative to mean y² on the sample (the search's
objective) and a digest of the stored tensors; `compare` prints the time ratio, how many layers are identical or
keep their formats, the geometric mean of the error ratios, and the layers that moved by more than 1 %.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import time

import torch


def capture(model_name: str, out: str, every: int) -> None:
    import lowbit_compile as lb

    core = importlib.import_module("lowbit_compile.quantize.core")
    q = importlib.import_module("lowbit_compile.quantize.fp4")
    saved = []
    real = core.quantize_fp4_group

    def recording(layers, sample, absmax, seed):
        saved.append(({f: (w.detach().clone(), s) for f, (w, s) in layers.items()}, sample.clone(),
                      None if absmax is None else absmax.clone(), seed))
        grid, rounds = q.CLIP_GRID, q.SEARCH_ROUNDS
        q.CLIP_GRID, q.SEARCH_ROUNDS = tuple(sorted(set(grid[::10]) | {1.0})), 1
        try:
            return real(layers, sample, absmax, seed)
        finally:
            q.CLIP_GRID, q.SEARCH_ROUNDS = grid, rounds

    core.quantize_fp4_group = recording
    try:
        if model_name == "minilm":
            from lowbit_compile.demo import load_minilm
            from lowbit_compile.pipeline import default_calibration

            model, tok = load_minilm()
            lb.quantize(model, "fp4", default_calibration(tok), tokenizer=tok, seed=0, progress=False)
        else:
            from lowbit_compile.evaluate import text_chunks
            from lowbit_compile.hf import load_smollm2

            loaded = load_smollm2()
            calibration = list(text_chunks(loaded.tokenizer, "calibration", max_chunks=32).split(4))
            lb.quantize(loaded.model, "fp4", calibration, seed=0, progress=False)
    finally:
        core.quantize_fp4_group = real
    per_block = 4  # attention input, attention output, MLP input, MLP output
    saved = [g for i, g in enumerate(saved) if (i // per_block) % every == 0]
    torch.save(saved, out)
    print(f"{len(saved)} groups -> {out}")


def run(groups_path: str, recipe: str, out: str) -> None:
    from lowbit_compile.recipe import parse_spec

    layer_mod = importlib.import_module("lowbit_compile.quantize.layer")
    spec = parse_spec(recipe)
    rows, total = [], 0.0
    for layers, sample, absmax, seed in torch.load(groups_path, weights_only=False):
        t = time.perf_counter()
        records = layer_mod.quantize_fp4_group({f: (w, spec) for f, (w, _) in layers.items()}, sample, absmax, seed)
        dt = time.perf_counter() - t
        total += dt
        x = sample.double().reshape(-1, sample.shape[-1])
        for f, r in records.items():
            energy = float((x @ layers[f][0].double().T).pow(2).mean())
            stored = r.qweight.numpy().tobytes() + r.w_scales.numpy().tobytes()
            stored += b"" if r.act_scale is None else r.act_scale.numpy().tobytes()
            rows.append({"fqn": f, "w": r.w_format, "a": r.a_format, "rel": r.proxy_loss / energy, "seconds": dt,
                         "digest": hashlib.sha256(stored).hexdigest()[:16]})
        print(f"{next(iter(layers))}: {dt:.2f} s", flush=True)
    with open(out, "w") as fh:
        json.dump({"module": layer_mod.__file__, "total": total, "rows": rows}, fh, indent=0)
    print(f"{recipe}: {total:.1f} s for {len(rows)} layers -> {out}")


def compare(a_path: str, b_path: str) -> None:
    with open(a_path) as fa, open(b_path) as fb:
        a, b = json.load(fa), json.load(fb)
    pairs = list(zip(a["rows"], b["rows"]))
    if [x["fqn"] for x, _ in pairs] != [y["fqn"] for _, y in pairs] or len(a["rows"]) != len(b["rows"]):
        raise SystemExit("the two runs are not over the same layers")
    ratios = [y["rel"] / x["rel"] if x["rel"] > 0 else 1.0 for x, y in pairs]
    n = len(pairs)
    print(f"time {a['total']:.1f} -> {b['total']:.1f} s ({a['total'] / b['total']:.2f}x)")
    print(f"identical {sum(x['digest'] == y['digest'] for x, y in pairs)}/{n}, same formats "
          f"{sum((x['w'], x['a']) == (y['w'], y['a']) for x, y in pairs)}/{n}, output error B/A: geometric mean "
          f"{math.exp(sum(math.log(r) for r in ratios) / n):.4f}, min {min(ratios):.4f}, max {max(ratios):.4f}")
    for (x, y), r in zip(pairs, ratios):
        if abs(r - 1) > 0.01 or (x["w"], x["a"]) != (y["w"], y["a"]):
            print(f"  {x['fqn']:45s} {x['w']}/{x['a']} -> {y['w']}/{y['a']}  "
                  f"{x['rel']:.5f} -> {y['rel']:.5f} ({r:.3f})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("model", choices=["minilm", "smollm2"])
    c.add_argument("out")
    c.add_argument("--every", type=int, default=1, help="keep the groups of every N-th block")
    r = sub.add_parser("run")
    r.add_argument("groups")
    r.add_argument("recipe", choices=["fp4", "fp4-rot", "w4a16-fp4"])
    r.add_argument("out")
    m = sub.add_parser("compare")
    m.add_argument("a")
    m.add_argument("b")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "capture":
        capture(args.model, args.out, args.every)
    elif args.cmd == "run":
        run(args.groups, args.recipe, args.out)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
