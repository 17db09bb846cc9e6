"""XNNPACK's two int8 × int4 kernels in executorch.runtime, one linear shape at a time: channelwise (qd8-f32-qc4w,
what export/decompose.py writes for a per-channel layer) against blockwise with one block of in_features
(qd8-f32-qb4w, what torchao's per-channel IntxUnpackedToInt8Tensor lowers to in ExecuTorch 1.5), and fp32.

Each program holds `--linears` independent linears of the shape (random int4 codes, float32 scales), so that one
call's time is mostly the kernels; "µs / linear" is the median call over interleaved rounds divided by that count.
"error": the largest deviation of the int4 program's outputs from the same weights in PyTorch with int8-simulated
activations (quantized_decomposed ops), relative to the largest output: the int8 activations' share is in both.

    python -m bench.xnnpack_int4 [--quick] [--shapes 22x384x384,16x1024x2816] [--rounds 30] [--doc]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

SHAPES = "22x384x384,22x384x1536,22x1536x384,16x1024x1024,16x1024x2816,1x1024x1024,1x4096x4096"


def _programs(n_in: int, n_out: int, k: int):
    """{"fp32" | "qc4w" | "qb4w": module} with the same int4 weights; qc4w is the exporter's own pattern
    (export.decompose.channelwise_int4_linear)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    from lowbit_compile.export.decompose import channelwise_int4_linear

    g = torch.Generator().manual_seed(0)
    codes = [torch.randint(-8, 8, (n_out, n_in), dtype=torch.int8, generator=g) for _ in range(k)]
    scales = [torch.rand(n_out, generator=g) * 0.01 + 1e-3 for _ in range(k)]

    class Float(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(k):
                self.register_buffer(f"w{i}", codes[i].float() * scales[i][:, None])

        def forward(self, x):
            return [nn.functional.linear(x, getattr(self, f"w{i}")) for i in range(k)]

    class Channelwise(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(k):
                self.register_buffer(f"c{i}", codes[i])
                self.register_buffer(f"s{i}", scales[i])
                self.register_buffer(f"z{i}", torch.zeros(n_out, dtype=torch.int64))

        def forward(self, x):
            return [channelwise_int4_linear(x, getattr(self, f"c{i}"), getattr(self, f"s{i}"), getattr(self, f"z{i}"))
                    for i in range(k)]

    class Blockwise(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(k):
                w = IntxUnpackedToInt8Tensor(
                    codes[i], scales[i].to(torch.bfloat16).float()[:, None], torch.zeros(n_out, 1, dtype=torch.int8),
                    torch.int4, (1, n_in), torch.float32,
                    IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)
                setattr(self, f"w{i}", nn.Parameter(w, requires_grad=False))

        def forward(self, x):
            return [nn.functional.linear(x, getattr(self, f"w{i}")) for i in range(k)]

    return {"fp32": Float().eval(), "qc4w": Channelwise().eval(), "qb4w": Blockwise().eval()}


def measure(tokens: int, n_in: int, n_out: int, k: int, rounds: int) -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from .common import time_interleaved

    x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(1))
    runtime, keep, methods, errors, nbytes = Runtime.get(), [], {}, {}, {}
    for name, module in _programs(n_in, n_out, k).items():
        with torch.no_grad():
            ref = module(x)
        program = to_edge_transform_and_lower(torch.export.export(module, (x,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
        buffer = program.buffer
        loaded = runtime.load_program(buffer)
        keep += [buffer, loaded]  # the runtime reads the buffer for as long as the method lives
        methods[name] = loaded.load_method("forward")
        ys = methods[name].execute([x])
        scale = max(float(r.abs().max()) for r in ref)
        errors[name] = max(float((y - r).abs().max()) for y, r in zip(ys, ref)) / scale
        nbytes[name] = len(buffer)
    ms = time_interleaved({n: (lambda m=m: m.execute([x])) for n, m in methods.items()}, rounds=rounds, warmup=2)
    us = {n: v * 1e6 / k for n, v in ms.items()}
    return [f"{tokens} × {n_in} → {n_out}", f"{us['fp32']:.1f}", f"{us['qb4w']:.1f}", f"{us['qc4w']:.1f}",
            f"{us['qb4w'] / us['fp32']:.2f}", f"**{us['qc4w'] / us['fp32']:.2f}**", f"{us['qb4w'] / us['qc4w']:.2f}",
            f"{errors['qb4w']:.1e}", f"{errors['qc4w']:.1e}"]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small shapes, fewer rounds")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated tokens x in x out")
    ap.add_argument("--linears", type=int, default=8, help="linears of one shape per program")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="threads of ExecuTorch's pool (XNNPACK)")
    ap.add_argument("--doc", action="store_true", help="also write the table into docs/benchmarks.md (one section "
                    "per CPU capability)")
    args = ap.parse_args(argv)
    from executorch.extension.pybindings import portable_lib

    from .common import machine, markdown_table, publish

    portable_lib._unsafe_reset_threadpool(args.threads)
    shapes = "22x384x384,1x1024x1024" if args.quick else args.shapes
    rounds = 5 if args.quick else args.rounds
    try:
        parsed = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    except ValueError:
        ap.error(f"--shapes {shapes!r}: give tokens x in x out, e.g. 22x384x384")
    if any(len(p) != 3 or min(p) < 1 for p in parsed):
        ap.error(f"--shapes {shapes!r}: each shape is three positive sizes, tokens x in x out")
    rows = []
    for tokens, n_in, n_out in parsed:
        rows.append(measure(tokens, n_in, n_out, args.linears, rounds))
        print(" | ".join(rows[-1]), flush=True)
    header = ["tokens × in → out", "fp32 µs / linear", "qb4w µs", "qc4w µs", "qb4w × fp32", "qc4w × fp32",
              "qb4w / qc4w", "qb4w error", "qc4w error"]
    text = "\n".join([
        "## XNNPACK int4 kernels: channelwise (qc4w) against blockwise (qb4w)\n",
        f"Machine: {machine()}; ExecuTorch threadpool {portable_lib._threadpool_get_thread_count()} thread(s). "
        f"{args.linears} linears of each shape per program, median of {rounds} interleaved rounds; error: relative "
        f"to the same int4 weights with int8-simulated activations in PyTorch (qb4w's includes its bfloat16 "
        f"scales).\n",
        markdown_table(header, rows),
    ])
    return publish("xnnpack_int4", text, doc=args.doc, by_isa=True)


if __name__ == "__main__":
    main()
