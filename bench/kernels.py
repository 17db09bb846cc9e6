"""Triton kernel throughput on a CUDA GPU, against torch's bfloat16 linear and a plain copy.

- GEMV at M = 1 (decode): achieved memory bandwidth, GB/s and % of the GPU's peak, counting the bytes the kernel
  must move (packed codes + scales + activations + outputs); torch bf16 F.linear for comparison.
- Hadamard (`lowbit::hadamard`, bf16, 2048 rows): GB/s against a plain copy (`clone`) of the same tensor.
- GEMM at M = 2048 (prefill): TFLOP/s (2·M·N·K / time) against torch bf16 F.linear.

Shapes: 4096×4096 and 4096×11008 in both directions (Llama-7B's attention and MLP projections). Weights are
random codes (the kernels' speed does not depend on their values). Times: CUDA-graph replay medians
(triton.testing.do_bench_cudagraph), so Python launch overhead is not counted. Tables go to
$LOWBIT_BENCH_OUT/kernels.md.

    python -m bench.kernels [--quick]       (needs a CUDA GPU and triton; exits with a message otherwise)
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in_features K, out_features N)
INT_FORMATS = (("int4", 4, 0), ("int4-g128", 4, 128), ("int3", 3, 0), ("int2", 2, 0))


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "bench.kernels measures the Triton kernels and needs a CUDA GPU; none is visible (CPU only)"
    from lowbit_compile.kernels import triton as gpu

    if not gpu.available():
        return "bench.kernels needs triton: pip install 'lowbit-compile[gpu]'"
    return None


def _time_ms(fn) -> float:
    import triton.testing

    fn()  # compile / warm up outside the graph capture
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # no graph capture possible: plain events (includes launch overhead)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _peaks() -> tuple[float | None, float | None]:
    """(bytes/s, bf16 tensor-core FLOP/s) theoretical peaks of this GPU, None where torch cannot tell."""
    try:
        from torch.cuda._device_limits import GPULimits

        limits = GPULimits(torch.device("cuda"))
    except Exception:
        return None, None
    bw = flops = None
    try:
        bw = float(limits.get_memory_bandwidth_Bps())
    except Exception:
        pass
    try:
        flops = float(limits.get_tflops_per_second(torch.bfloat16, use_tensor_cores=True)) * 1e12
    except Exception:
        pass
    return bw, flops


def _int_layer(k: int, n: int, bits: int, group: int):
    from lowbit_compile import formats

    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n, formats.num_groups(k, group), device="cuda") * 0.01 + 1e-3).half()
    return formats.pack(codes, bits), scales


def _fp4_layer(k: int, n: int):
    from lowbit_compile.formats import fp4 as f4

    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    return f4.pack_codes(codes), (torch.rand(n, 1, device="cuda") * 0.01 + 1e-3).half()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _candidates(k: int, n: int, m: int):
    """(name, fn, bytes moved) of every linear at this shape and M, torch bf16 first."""
    from lowbit_compile import hadamard as H

    ops = torch.ops.lowbit
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = [("torch bf16 linear", lambda: torch.nn.functional.linear(x, w), _nbytes(x, w) + m * n * 2)]
    for name, bits, group in INT_FORMATS:
        q, s = _int_layer(k, n, bits, group)
        out.append((name, lambda q=q, s=s, bits=bits, group=group:
                    ops.rotated_linear(x, q, s, None, None, None, None, None, bits, k, group),
                    _nbytes(x, q, s) + m * n * 2))
    q, s = _int_layer(k, n, 4, 0)
    su, sv = H.random_signs(k, 0).cuda(), H.random_signs(n, 1).cuda()
    f_in, f_out = (None if f is None else f.cuda() for f in (H.factor(k), H.factor(n)))
    out.append(("int4 + Hadamard in/out (QuIP)",
                lambda: ops.rotated_linear(x, q, s, su, sv, f_in, f_out, None, 4, k, 0),
                _nbytes(x, q, s) + m * n * 2))
    q4, s4 = _fp4_layer(k, n)
    shift = torch.randint(0, 3, (k,), dtype=torch.uint8, device="cuda")
    act_scale = torch.tensor([0.05], dtype=torch.float16, device="cuda")
    out.append(("fp4 W4A16", lambda: ops.fp4_linear(x, q4, s4, None, None, "e2m1", None, None, k),
                _nbytes(x, q4, s4) + m * n * 2))
    out.append(("fp4 W4A4", lambda: ops.fp4_linear(x, q4, s4, shift, act_scale, "e2m1", "e2m1", None, k),
                _nbytes(x, q4, s4, shift) + m * n * 2))
    return out


def _pct(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:.0f}%" if peak else "n/a"


def gemv_table(shapes, peak_bw) -> list[list]:
    rows = []
    for k, n in shapes:
        for name, fn, nbytes in _candidates(k, n, 1):
            ms = _time_ms(fn)
            gbs = nbytes / ms / 1e6
            rows.append([f"{k}→{n}", name, f"{ms * 1e3:.1f}", f"{gbs:.0f}", _pct(gbs * 1e9, peak_bw)])
    return rows


def gemm_table(shapes, m, peak_flops) -> list[list]:
    rows = []
    for k, n in shapes:
        for name, fn, _ in _candidates(k, n, m):
            ms = _time_ms(fn)
            tflops = 2 * m * n * k / ms / 1e9
            rows.append([f"{k}→{n}", name, f"{ms * 1e3:.1f}", f"{tflops:.1f}", _pct(tflops * 1e12, peak_flops)])
    return rows


def hadamard_table(sizes, rows_, peak_bw) -> list[list]:
    from lowbit_compile import hadamard as H

    out = []
    for n in sizes:
        x = torch.randn(rows_, n, device="cuda", dtype=torch.bfloat16)
        s = H.random_signs(n, 0).cuda()
        f = H.factor(n)
        f = None if f is None else f.cuda()
        nbytes = 2 * x.numel() * x.element_size()  # read once, write once
        for name, fn in (("copy (x.clone())", x.clone),
                         (f"lowbit::hadamard ({H.plan(n).factor_size}·{H.plan(n).pow2})",
                          lambda x=x, s=s, f=f: torch.ops.lowbit.hadamard(x, s, f, False))):
            ms = _time_ms(fn)
            gbs = nbytes / ms / 1e6
            out.append([f"{rows_}×{n}", name, f"{ms * 1e3:.1f}", f"{gbs:.0f}", _pct(gbs * 1e9, peak_bw)])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4096×4096 only")
    args = parser.parse_args(argv)
    why = _unavailable()
    if why:
        print(f"skipping bench.kernels: {why}", file=sys.stderr)
        return 1
    from .common import markdown_table, publish

    torch.manual_seed(0)
    shapes = SHAPES[:1] if args.quick else SHAPES
    peak_bw, peak_flops = _peaks()
    props = torch.cuda.get_device_properties(0)
    head = (f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; peaks: "
            f"{'n/a' if peak_bw is None else f'{peak_bw / 1e9:.0f} GB/s'}, "
            f"{'n/a' if peak_flops is None else f'{peak_flops / 1e12:.0f} bf16 TFLOP/s'}")
    with torch.no_grad():
        gemv = gemv_table(shapes, peak_bw)
        had = hadamard_table((4096, 11008) if not args.quick else (4096,), 2048, peak_bw)
        gemm = gemm_table(shapes, 2048, peak_flops)
    text = "\n\n".join([
        f"## Triton kernels\n\n{head}",
        "### GEMV, M = 1 (decode): bytes moved / time\n\n"
        + markdown_table(["K→N", "kernel", "µs", "GB/s", "% of peak"], gemv),
        "### Hadamard, bfloat16: read + write / time\n\n"
        + markdown_table(["shape", "kernel", "µs", "GB/s", "% of peak"], had),
        "### GEMM, M = 2048 (prefill): 2·M·N·K / time\n\n"
        + markdown_table(["K→N", "kernel", "µs", "TFLOP/s", "% of bf16 peak"], gemm),
    ])
    publish("kernels", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
