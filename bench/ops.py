"""Per-op CPU latency of one linear: float32 and bfloat16 F.linear against the lowbit ops, at M = 1, 16, 512 rows.

Weights are random (N(0, 1/in)); the integer layers are RTN with the randomized Hadamard on both sides (recipes
w2/w3/w4: rotated, per-row scales, the shape of a QuIP layer) and run through `lowbit::int4pack_linear`, the CPU
fast path the backend picks (codes widened to the int4 kernel's layout, bfloat16 activations inside the op); one
row runs without the rotation to show what the Hadamard transforms cost. For contrast: the reference op
`lowbit::rotated_linear` (decodes the weight on every call) and FP4 W4A16 through `lowbit::fp4_linear` (its
reference implementation on CPU). FP4 runs through `lowbit::fp4pack_linear` (kernels/cpu_fp4.py: E1M2 codes as
one int4 digit, E2M1/E3M0 as two), W4A16 in each format and W4A4 in E2M1. Every op is called eagerly, with the
caches flushed before each call (as in a model larger than the cache, where every layer's weights come from
memory); the candidates take turns round by round and each figure is the median, so the ratios hold on a loaded
machine even where the absolute times do not.

    python -m bench.ops [--quick] [--threads N] [--no-doc]
"""

from __future__ import annotations

import argparse

import torch

from .common import (
    cpu_name,
    flush_caches,
    load_average,
    machine,
    markdown_table,
    publish,
    time_interleaved,
    versions,
)

SHAPES = [(4096, 4096), (4096, 11008)]  # (out_features, in_features): attention projection, Llama-7B down_proj
ROWS = (1, 16, 512)
ROUNDS = {1: 40, 16: 10, 512: 3}


def _records(w: torch.Tensor) -> dict:
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import LayerSpec, parse_spec

    recs = {f"w{b}": quantize_weight("bench", w, parse_spec(f"w{b}"), seed=0) for b in (2, 3, 4)}
    recs["w4-rtn"] = quantize_weight("bench", w, parse_spec("w4-rtn"), seed=0)
    fp4 = LayerSpec(bits=4, method="fp4", rotate=False, act_quant=False, fp4_search=False, act_exponents=False)
    g = torch.Generator().manual_seed(0)
    recs["fp4"] = quantize_weight("bench", w, fp4, sample=torch.randn(64, w.shape[1], generator=g))
    return recs


def variants(w: torch.Tensor, quick: bool) -> dict:
    """name -> (make_call(x) -> zero-argument callable, weight bytes, rows it runs at)."""
    from lowbit_compile import hadamard
    from lowbit_compile.kernels import cpu, cpu_fp4

    recs = _records(w)
    wb = w.to(torch.bfloat16)
    out = {
        "float32 F.linear": (lambda x: lambda: torch.nn.functional.linear(x, w), w.numel() * 4, ROWS),
        "bfloat16 F.linear (bf16 x, bf16 W)": (lambda x: (lambda xb: lambda: torch.nn.functional.linear(xb, wb))(
            x.to(torch.bfloat16)), w.numel() * 2, ROWS),
    }
    for name, label in (("w4", "lowbit int4, int4pack"), ("w3", "lowbit int3, int4pack (widened)"),
                        ("w2", "lowbit int2, int4pack (widened)"), ("w4-rtn", "lowbit int4, int4pack, no rotation")):
        rec = recs[name]
        packed = cpu.packed_for(rec)
        args = cpu.op_args(packed, rec.su, rec.sv, None)
        blocks = sum(b.numel() * 4 for b in {id(b): b for b in (*args[4], *args[5])}.values())
        out[label] = ((lambda a: lambda x: lambda: torch.ops.lowbit.int4pack_linear(x, *a))(args),
                      packed.nbytes() + blocks, ROWS)
    ref_rows = (1, 16) if quick else ROWS
    rec = recs["w4"]
    had_in, had_out = hadamard.factor(rec.in_features), hadamard.factor(rec.out_features)
    ref_args = (rec.qweight, rec.scales, rec.su, rec.sv, had_in, had_out, None, 4, rec.in_features, 0)
    out["lowbit int4, reference rotated_linear"] = (
        lambda x: lambda: torch.ops.lowbit.rotated_linear(x, *ref_args),
        rec.qweight.numel() + rec.scales.numel() * 2, ref_rows)
    f = recs["fp4"]
    for fmt in ("e2m1", "e1m2", "e3m0"):  # the same codes read in each format: the speed depends on the format only
        pk = cpu_fp4.pack_fp4(f.qweight, f.w_scales, fmt, f.in_features)
        a16 = cpu_fp4.op_args(pk, None, None, None, None, None)
        out[f"FP4 {fmt} W4A16, fp4pack"] = ((lambda a: lambda x: lambda: torch.ops.lowbit.fp4pack_linear(x, *a))(a16),
                                            pk.nbytes(), ROWS)
        if fmt == "e2m1":
            a4 = cpu_fp4.op_args(pk, None, None, torch.tensor([0.05], dtype=torch.float16), "e2m1", None)
            out["FP4 e2m1 W4A4, fp4pack"] = ((lambda a: lambda x: lambda: torch.ops.lowbit.fp4pack_linear(x, *a))(a4),
                                             pk.nbytes(), ROWS)
    fp4_args = (f.qweight, f.w_scales, None, None, f.w_format, None, None, f.in_features)
    out["FP4 W4A16, fp4_linear (reference)"] = (lambda x: lambda: torch.ops.lowbit.fp4_linear(x, *fp4_args),
                                                 f.qweight.numel() + f.w_scales.numel() * 2, ref_rows)
    return out


def run_shape(out_f: int, in_f: int, rows, quick: bool) -> tuple[list[list], dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    table = variants(w, quick)
    ms: dict[str, dict[int, float]] = {k: {} for k in table}
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, in_f, generator=g)
            fns = {k: make(x) for k, (make, _, at) in table.items() if m in at}
            for k, sec in time_interleaved(fns, ROUNDS[m] // (2 if quick else 1) or 1, before=flush_caches).items():
                ms[k][m] = 1e3 * sec
            print(f"{out_f}x{in_f} M={m}: " + ", ".join(f"{k} {v[m]:.3f}" for k, v in ms.items() if m in v),
                  flush=True)
    base = ms["float32 F.linear"]
    result = []
    for k, (_, nbytes, _) in table.items():
        cells = [f"{ms[k][m]:.3f} ({ms[k][m] / base[m]:.2f}×)" if m in ms[k] else "—" for m in rows]
        result.append([k, f"{nbytes / 2**20:.1f}", *cells])
    return result, ms


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, M = 1 and 16, fewer rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md (--quick never does)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lowbit_compile  # noqa: F401  (registers the ops)

    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = (1, 16) if args.quick else ROWS
    load_before = load_average()
    text = ["## CPU latency of one linear (issue 8)\n",
            f"`python -m bench.ops{' --quick' if args.quick else ''}`. {cpu_name()}; {machine()}; {versions()}. "
            f"Machine load: {load_before} at the start, {{after}} at the end. Milliseconds per call, median of "
            f"interleaved rounds, caches flushed before each call; in brackets the ratio to float32 F.linear "
            f"measured in the same rounds. "
            f"Weight MB: what the op reads (the int4pack rows include the bfloat16 scales and rotation blocks)."]
    goal_rows = {}
    for out_f, in_f in shapes:
        result, ms = run_shape(out_f, in_f, rows, args.quick)
        text += [f"\n### {out_f}×{in_f} (out × in)\n",
                 markdown_table(["op", "weight MB", *[f"M = {m}" for m in rows]], result)]
        goal_rows[(out_f, in_f)] = ms
    text[1] = text[1].replace("{after}", load_average())
    verdict = []
    for shape, ms in goal_rows.items():
        f32 = ms["float32 F.linear"][1]
        r = {k: ms[k][1] / f32 for k in ms if k.endswith("fp4pack") or ("int4pack" in k and k.startswith("lowbit int"))}
        worst = max(r, key=r.get)
        verdict.append(f"{shape[0]}×{shape[1]}: slowest quantized op at M = 1 is {worst} at {r[worst]:.2f}× float32 "
                       f"(goal ≤ 1); "
                       f"int4 {r['lowbit int4, int4pack']:.2f}×, int2 {r['lowbit int2, int4pack (widened)']:.2f}× "
                       f"(goal ≤ 0.5)")
    text.append("\n" + "\n".join(f"- {v}" for v in verdict))
    # a smoke run keeps the figures
    return publish("ops", "\n".join(text), doc=not (args.no_doc or args.quick), by_isa=True)


if __name__ == "__main__":
    main()
