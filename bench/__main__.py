"""`make bench`: run every benchmark and print where the tables went."""

import importlib
import sys

BENCHMARKS = ["bench.quality", "bench.mixed_precision", "bench.onnx_latency", "bench.export_size"]

for name in BENCHMARKS:
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        print(f"skipping {name}: {e}", file=sys.stderr)
        continue
    print(f"== {name}", flush=True)
    mod.main([])
