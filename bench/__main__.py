"""`make bench`: run every benchmark (or the ones named) and print where the tables went.

    python -m bench [--quick] [NAME ...]        e.g. `python -m bench --quick ops e2e`

--quick runs each benchmark's smoke version (minutes instead of hours). A benchmark that cannot run here (an
optional package missing, no GPU) is skipped with its reason; the others still run.
"""

import argparse
import importlib
import sys

BENCHMARKS = ["bench.quality", "bench.mixed_precision", "bench.onnx_latency", "bench.export_size", "bench.kernels",
              "bench.ops", "bench.e2e", "bench.native"]
QUICK_ARGS = {"bench.onnx_latency": ["--variants", "w4,w2", "--runs", "5"]}  # default: ["--quick"]

ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
ap.add_argument("--quick", action="store_true", help="each benchmark's quick smoke run")
ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {[b.split('.')[1] for b in BENCHMARKS]}")
args = ap.parse_args()
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
