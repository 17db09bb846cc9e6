"""`make bench`: run every benchmark (or the ones named) and print where the tables went.

    python -m bench [--quick] [--isa avx2] [NAME ...]        e.g. `python -m bench --quick ops e2e`

--quick runs each benchmark's smoke version (minutes instead of hours). A benchmark that cannot run here (an
optional package missing, no GPU) is skipped with its reason; the others still run.

--isa avx2 runs the benchmarks as on an AVX2-only CPU: ATen's kernels at AVX2 (ATEN_CPU_CAPABILITY), oneDNN's
GEMMs at AVX2 (ONEDNN_MAX_CPU_ISA, so no bfloat16 instructions), the native kernels' AVX2 code (LOWBIT_NATIVE_ISA),
and kernels/cpu_caps.py deciding as on such a CPU. Check once against a real AVX2 machine before trusting it.
"""

import argparse
import importlib
import os
import sys

ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "LOWBIT_NATIVE_ISA": "avx2"},
           "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX",
                      "LOWBIT_NATIVE_ISA": "avx512"}}

BENCHMARKS = ["bench.quality", "bench.quality_llm", "bench.mixed_precision", "bench.onnx_latency", "bench.pte_latency",
              "bench.xnnpack_int4",
              "bench.quantize_time", "bench.distributed", "bench.llm_size", "bench.stream_memory", "bench.export_size",
              "bench.kernels",
              "bench.ops", "bench.e2e", "bench.native", "bench.e8_speed"]
QUICK_ARGS = {"bench.onnx_latency": ["--variants", "w4,w2", "--runs", "5"],  # default: ["--quick"]
              "bench.llm_size": ["--no-export"], "bench.stream_memory": ["--layers", "8"]}

ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
ap.add_argument("--quick", action="store_true", help="each benchmark's quick smoke run")
ap.add_argument("--isa", choices=sorted(ISA_ENV), help="emulate a CPU with at most this instruction set")
ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {[b.split('.')[1] for b in BENCHMARKS]}")
args = ap.parse_args()
if args.isa and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):  # set before torch loads
    os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], {**os.environ, **ISA_ENV[args.isa]})
selected = [b for b in BENCHMARKS if not args.names or b.split(".")[1] in args.names]
unknown = sorted(set(args.names) - {b.split(".")[1] for b in BENCHMARKS})
if unknown:
    ap.error(f"unknown benchmark(s) {unknown}")

for name in selected:
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        print(f"skipping {name}: {e}", file=sys.stderr)
        continue
    print(f"== {name}", flush=True)
    try:
        mod.main(QUICK_ARGS.get(name, ["--quick"]) if args.quick else [])
    except SystemExit as e:  # a benchmark that cannot run on this machine says why and exits
        if e.code not in (None, 0):
            print(f"skipping {name}: {e.code}", file=sys.stderr)
