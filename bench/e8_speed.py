"""CPU latency of E8 layers (issue 20: `w2-e8` at M = 1 no slower than `w4`) against int4 QuIP-style layers and
float32 F.linear, one linear at a time, as the backend runs them on this machine.

Layers are quantized from a random weight (N(0, 1/in)) with an identity Hessian (block LDLQ is then nearest
rounding; the speed does not depend on the values): `w4` (int4, randomized Hadamard on both sides), `w2-e8` (one
E8P stage: its 16-bit codes as 4-bit digits), `w3-e8` and `w4-e8` (two stages: two 4-bit passes in one call).
Each runs through the op and packing `kernels.cpu_caps.choose_for` picks for its record (the native kernel where it
is built: `lowbit::native_linear` on `cpu_native.packed_for(rec)`, the same call the backend makes); the E8
reference op `lowbit::e8p_linear` (decodes the weight every call) is shown for contrast. Caches are flushed before
every call (a model larger than the cache), the candidates take turns round by round and each figure is the median.

    python -m bench.e8_speed [--quick] [--threads N] [--doc]
"""

from __future__ import annotations

import argparse

import torch

from .common import cpu_name, flush_caches, load_average, machine, markdown_table, publish, time_interleaved

SHAPES = ((4096, 4096), (4096, 11008))  # (out_features, in_features)
ROWS = (1, 16)
ROUNDS = {1: 40, 16: 10}
RECIPES = ("w4", "w2-e8", "w3-e8", "w4-e8")


def _e8_reference(rec):
    """The maker of calls of `lowbit::e8p_linear` (the E8 reference op: decodes the codes every call) on `rec`."""
    from lowbit_compile import hadamard

    had_in, had_out = hadamard.factor(rec.in_features), hadamard.factor(rec.out_features)
    args = (rec.qweight, rec.scales, rec.su, rec.sv, had_in, had_out, None, rec.bits, rec.in_features)
    return lambda x: lambda: torch.ops.lowbit.e8p_linear(x, *args)


def _call(rec):
    """(kernel name, zero-argument-callable maker) for a record, on the kernel the backend picks."""
    from lowbit_compile.kernels import cpu_caps, cpu_native

    choice = cpu_caps.choose_for(rec)
    if choice.kernel == "native":
        args = cpu_native.op_args(cpu_native.packed_for(rec), rec.su, rec.sv, None)
        return "native", lambda x: lambda: torch.ops.lowbit.native_linear(x, *args)
    if choice.kernel == "int4pack":
        from lowbit_compile.kernels import cpu

        args = cpu.op_args(cpu.packed_for(rec), rec.su, rec.sv, None)
        return "int4pack", lambda x: lambda: torch.ops.lowbit.int4pack_linear(x, *args)
    if getattr(rec, "kind", "int") == "e8":
        return "reference e8p_linear", _e8_reference(rec)
    raise SystemExit(f"bench.e8_speed: {rec.fqn} runs on {choice.kernel} ({choice.reason}); nothing to compare")


def run_shape(out_f: int, in_f: int, rows, rounds_div: int) -> list[list]:
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    eye = torch.eye(in_f, dtype=torch.float64)
    fns, kernels, bits = {}, {}, {}
    for name in RECIPES:
        rec = quantize_weight("bench", w, parse_spec(name), seed=0, hessian=eye)
        kernels[name], fns[name] = _call(rec)
        bits[name] = rec.bits_per_weight()
        if name == "w2-e8":
            fns["w2-e8 reference"] = _e8_reference(rec)
            kernels["w2-e8 reference"], bits["w2-e8 reference"] = "reference e8p_linear", bits[name]
    fns = {"float32 F.linear": lambda x: lambda: torch.nn.functional.linear(x, w), **fns}
    kernels["float32 F.linear"], bits["float32 F.linear"] = "aten", 32.0
    ms: dict[str, dict[int, float]] = {k: {} for k in fns}
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, in_f, generator=g)
            calls = {k: make(x) for k, make in fns.items() if m == 1 or "reference" not in k}
            for k, sec in time_interleaved(calls, max(1, ROUNDS[m] // rounds_div), before=flush_caches).items():
                ms[k][m] = 1e3 * sec
            print(f"{out_f}x{in_f} M={m}: " + ", ".join(f"{k} {v[m]:.3f}" for k, v in ms.items() if m in v),
                  flush=True)
    out = []
    for k in fns:
        cells = [f"{ms[k][m]:.3f} ({ms[k][m] / ms['w4'][m]:.2f}×)" if m in ms[k] else "—" for m in rows]
        out.append([k, kernels[k], f"{bits[k]:.2f}", *cells])
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.e8_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096×4096 only, fewer rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", action="store_true", help="also update docs/benchmarks.md (per CPU capability)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lowbit_compile  # noqa: F401  (registers the ops)

    text = [f"`python -m bench.e8_speed{' --quick' if args.quick else ''}`. {cpu_name()}; {machine()}; "
            f"{load_average()} at the start. Milliseconds per call, median of interleaved rounds with caches "
            f"flushed before each call; in brackets the ratio to `w4` in the same rounds (≤ 1: no slower)."]
    for out_f, in_f in SHAPES[:1] if args.quick else SHAPES:
        text += [f"\n{out_f}×{in_f} (out × in)\n",
                 markdown_table(["layer", "kernel", "bits/weight", *[f"M = {m}" for m in ROWS]],
                                run_shape(out_f, in_f, ROWS, 4 if args.quick else 1))]
    return publish("e8_speed", "\n".join(text), doc=args.doc and not args.quick, by_isa=True)


if __name__ == "__main__":
    main()
