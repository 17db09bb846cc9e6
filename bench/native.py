"""The native CPU kernels (`lowbit_native::linear`, kernels/native) against float32 F.linear, one thread.

Shapes (N × K, out × in): 4096 × 4096, 4096 × 11008 and 11008 × 4096 (Llama-7B's attention, down and up/gate
projections), at M = 1 (decode) and M = 512 (prefill). Rows:

- float32 F.linear: the baseline of every ratio;
- aten._weight_int4pack_mm_for_cpu with bfloat16 activations, one scale per row repeated over groups of 256 (as
  kernels/cpu.py calls it), for reference; at M = 512 one round only (it costs about one M = 1 call per row);
- native 2/3/4-bit, act="int8" and act="float", with the op's default prefill_rows (the "path" column says which
  kernel ran: the int8 kernel, the fused float kernel, or decode + float32 sgemm); at M = 512 also the int8
  kernel forced (prefill_rows=0), an int8 GEMM.

Weights are random codes with one float32 scale per row (the speed does not depend on the values). Every call
starts cold: a 96 MB buffer is read before each one (bench.common.flush_caches), as in a model larger than the
last-level cache; the candidates take turns round by round and each figure is the median, so the ratios hold on
a loaded machine even where the absolute times drift. The int8 mode's accuracy is measured on Gaussian inputs
(K = 4096): ‖y_int8 − y_float‖ / ‖y_float‖ against the float mode (the exact dequantized weights).

    python -m bench.native [--quick] [--threads N] [--doc]
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

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (N out_features, K in_features)
ROWS = (1, 512)
ROUNDS = {1: 30, 512: 3}
ZERO = {2: 1.5, 3: 3.5, 4: 8.0}


def _int4pack(codes: torch.Tensor, group: int = 256):
    """The weight in aten's int4 CPU kernel layout (4-bit codes, bf16 scale per row over groups of 256)."""
    n, k = codes.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    s = torch.full((k // group, n), 0.01)
    scales_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_zeros, group


def _path(m: int, bits: int, act: str, prefill_rows: int) -> str:
    from lowbit_compile.kernels import native

    if prefill_rows < 0:
        prefill_rows = native.default_prefill_rows(act, bits)
    if prefill_rows and m >= prefill_rows:
        return "decode + sgemm"
    return "int8 kernel" if act == "int8" else "fused float kernel"


def candidates(n: int, k: int, m: int, quick: bool):
    """(name, path, weight bytes, fn) for one shape and M."""
    from lowbit_compile.kernels import native

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(m, k, generator=g)
    out = [("float32 F.linear", "sgemm/sgemv", w.numel() * 4, lambda: torch.nn.functional.linear(x, w))]
    if not (quick and m > 1):
        packed, sz, group = _int4pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g))
        xb = x.to(torch.bfloat16)
        out.append(("aten int4pack (bf16 x)", "_weight_int4pack_mm_for_cpu", packed.numel() + sz.numel() * 2,
                    lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group, sz)))
    for bits in (2, 3, 4):
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        packed = native.pack(codes, bits)
        scales = torch.rand(n, 1, generator=g) * 0.01 + 0.001
        nbytes = packed.numel() + scales.numel() * 4
        modes = [("int8", -1), ("float", -1)] if m == 1 else [("int8", -1), ("int8", 0)]
        for act, pr in modes:
            name = f"native int{bits}, act={act}" + (", prefill_rows=0" if pr == 0 else "")
            out.append((name, _path(m, bits, act, pr), nbytes,
                        (lambda p=packed, s=scales, b=bits, a=act, r=pr:
                         native.linear(x, p, s, b, ZERO[b], n, k, a, r))))
    return out


def int8_accuracy(k: int = 4096, n: int = 512, m: int = 16) -> list[list]:
    from lowbit_compile.kernels import native

    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g)
    rows = []
    for bits in (2, 3, 4):
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        packed, scales = native.pack(codes, bits), torch.rand(n, 1, generator=g) * 0.01 + 0.001
        ref = native.linear(x, packed, scales, bits, ZERO[bits], n, k, "float", 0)
        y = native.linear(x, packed, scales, bits, ZERO[bits], n, k, "int8", 0)
        rel = float((y - ref).norm() / ref.norm())
        worst = float(((y - ref).abs() / ref.abs().clamp_min(1e-6 * float(ref.abs().max()))).median())
        rows.append([f"int{bits}", f"{100 * rel:.3f} %", f"{100 * worst:.2f} %"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.native", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096 × 4096 only, fewer rounds, no int4pack at M = 512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", action="store_true", help="also write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    from lowbit_compile.kernels import native

    if not native.available():
        raise SystemExit(f"bench.native: {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    caps = native.capabilities()
    shapes = SHAPES[:1] if args.quick else SHAPES
    header = ["N × K", "M", "variant", "path", "weight MB", "ms", "× float32"]
    table = []
    for n, k in shapes:
        for m in ROWS:
            cands = candidates(n, k, m, args.quick)
            rounds = max(2, ROUNDS[m] // (3 if args.quick else 1))
            fns = {name: fn for name, _, _, fn in cands if not (m > 1 and name.startswith("aten"))}
            times = time_interleaved(fns, rounds, before=flush_caches)
            for name, _, _, fn in cands:  # the int4pack kernel at M = 512: one timed call (seconds)
                if name not in times:
                    times.update(time_interleaved({name: fn}, 1, warmup=0, before=flush_caches))
            base = times["float32 F.linear"]
            for name, path, nbytes, _ in cands:
                table.append([f"{n} × {k}", m, name, path, f"{nbytes / 2**20:.1f}", f"{1e3 * times[name]:.3f}",
                              f"{times[name] / base:.3f}"])
    text = "\n\n".join([
        f"### Native CPU kernels (lowbit_native::linear), {args.threads} thread(s)",
        f"{cpu_name()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; kernels: "
        f"{caps['selected']} ({caps['int8_dot']}); {machine()}; {versions()}; {load_average()}. Caches flushed "
        f"(96 MB read) before every call; medians of interleaved rounds.",
        markdown_table(header, table),
        "int8 activations (blocks of 32, d = max|x|/127) against the exact float mode, Gaussian x, K = 4096, "
        "one scale per row:",
        markdown_table(["weights", "‖y_int8 − y_float‖ / ‖y_float‖", "median of abs(y_int8 − y_float) / abs(y_float)"],
                       int8_accuracy()),
    ])
    publish("native", text, doc=args.doc, by_isa=True)


if __name__ == "__main__":
    main()
