"""onnxruntime CPU latency at batch 1 of exported low-bit models vs the float ONNX model.

A tiny but linear-dominated Llama (one decoder layer, hidden 768 by default, vocabulary 64) is quantized with
each recipe (RTN with the randomized Hadamard; no calibration needed), exported with `export_onnx`
(MatMulNBits for 2/4/8 bits, integer-op unpack + MatMul for 3 bits) and timed in onnxruntime
(CPUExecutionProvider, `session.qdq_matmulnbits_accuracy_level` = 0) against the same model exported in float32.

    python -m bench.onnx_latency [--hidden 768] [--layers 1] [--recipes w4,w2] [--seqs 1,32] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def build_model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def export_float(model, ids, path: str) -> None:
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    with torch.no_grad():
        prog = torch.onnx.export(model, (ids,), dynamo=True, opset_version=21, external_data=False,
                                 dynamic_shapes=({0: batch, 1: seq},))
    prog.save(path, external_data=False)


def latency_ms(path: str, seq: int, runs: int, threads: int) -> float:
    import onnxruntime as ort

    from lowbit_compile.export.onnx import exact_session_options

    so = exact_session_options()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: torch.randint(0, 64, (1, seq)).numpy()}
    for _ in range(max(3, runs // 10)):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--recipes", default="w4,w2")
    ap.add_argument("--seqs", default="1,32")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    from lowbit_compile.export.onnx import export_onnx, onnx_file_bytes
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    from .common import machine, markdown_table, write

    model = build_model(args.hidden, args.layers)
    seqs = [int(s) for s in args.seqs.split(",")]
    ids = torch.randint(0, 64, (2, 8))
    linears = {f: m for f, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_weights = sum(m.weight.numel() for m in linears.values())
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fpath = os.path.join(tmp, "float.onnx")
        export_float(model, ids, fpath)
        base = {s: latency_ms(fpath, s, args.runs, args.threads) for s in seqs}
        fbytes = onnx_file_bytes(fpath)
        rows.append(["float32", "MatMul", f"{fbytes / 1e6:.2f}", "32"]
                    + [f"{base[s]:.3f} (1.00×)" for s in seqs])
        for recipe in args.recipes.split(","):
            spec = parse_spec(recipe)
            recs = {f: quantize_weight(f, m.weight, spec, seed=0) for f, m in linears.items()}
            path = os.path.join(tmp, f"{recipe}.onnx")
            res = export_onnx(model, recs, (ids,), path)
            lat = {s: latency_ms(path, s, args.runs, args.threads) for s in seqs}
            route = ",".join(sorted(set(res["routes"].values())))
            recipe_bits = sum(r.bits_per_weight() * r.in_features * r.out_features for r in recs.values())
            rows.append([recipe, route, f"{res['bytes'] / 1e6:.2f}", f"{recipe_bits / n_weights:.2f}"]
                        + [f"{lat[s]:.3f} ({base[s] / lat[s]:.2f}×)" for s in seqs])
    header = ["model", "ONNX route", "file MB", "recipe bits/weight"] + [f"ms @ batch 1, seq {s}" for s in seqs]
    text = (f"onnxruntime CPU latency, tiny Llama (hidden {args.hidden}, {args.layers} layer(s), "
            f"{n_weights / 1e6:.2f} M linear weights), {args.threads} threads, median of {args.runs}; "
            f"{machine()}\n\n" + markdown_table(header, rows))
    print(text)
    write("onnx_latency.md", text)
    return text


if __name__ == "__main__":
    main()
