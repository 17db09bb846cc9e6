"""onnxruntime CPU latency at batch 1 of exported low-bit models vs the float ONNX model.

A tiny but linear-dominated Llama (one decoder layer, hidden 768 by default, vocabulary 64) is quantized with
each variant (data-free RTN with the randomized Hadamard; FP4 with the max-scaled quantizer on a random input
sample, which has the searched recipes' structure), exported with `export_onnx` and timed in onnxruntime
(CPUExecutionProvider, `session.qdq_matmulnbits_accuracy_level` = 0, i.e. float32 activations everywhere)
against the same model exported in float32. Also reported: the file size, the recipe's bits per weight and the
session creation time (onnxruntime folds the in-graph unpacking of 2/3-bit codes and FP4 tables then).

    python -m bench.onnx_latency [--hidden 768] [--layers 1] [--variants w4,w2,...] [--seqs 1,32] [--runs 30]

Variants: VARIANTS below (recipe, export options); e.g. "w2:native" is 2-bit through MatMulNBits' own 2-bit
kernel instead of codes widened to 4 bits in the graph, "w8:native" 8-bit through MatMulNBits instead of a
float weight dequantized at load, "w2:std" standard ops only (DequantizeLinear, which onnxruntime fuses into
MatMulNBits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

VARIANTS = {
    "w4": ("w4", {}),
    "w3": ("w3", {}),
    "w2": ("w2", {}),
    "w2:native": ("w2", {"native_nbits": True}),
    "w2:std": ("w2", {"standard_ops": True}),
    "w4:std": ("w4", {"standard_ops": True}),
    "w8": ("w8", {}),
    "w8:native": ("w8", {"native_nbits": True}),
    "fp4-w4a16": ("fp4-w4a16", {}),
    "fp4-rot": ("fp4-rot", {}),
}
DEFAULT_VARIANTS = "w4,w3,w2,w2:native,w2:std,w4:std,w8,w8:native,fp4-w4a16,fp4-rot"


def build_model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def quantize(linears: dict, recipe: str) -> dict:
    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import LayerSpec, parse_spec

    if recipe.startswith("fp4"):
        rot = recipe == "fp4-rot"
        spec = LayerSpec(bits=4, method="fp4", rotate=rot, act_quant=rot, fp4_search=False, act_exponents=False)
        g = torch.Generator().manual_seed(0)
        return {f: quantize_weight(f, m.weight, spec, sample=torch.randn(64, m.in_features, generator=g))
                for f, m in linears.items()}
    spec = parse_spec(recipe)
    return {f: quantize_weight(f, m.weight, spec, seed=0) for f, m in linears.items()}


def export_float(model, ids, path: str) -> None:
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    with torch.no_grad():
        prog = torch.onnx.export(model, (ids,), dynamo=True, opset_version=21, external_data=False,
                                 dynamic_shapes=({0: batch, 1: seq},), report=False, verbose=False)
    prog.save(path, external_data=False)


def session(path: str, threads: int):
    import onnxruntime as ort

    from lowbit_compile.export.onnx import exact_session_options

    so = exact_session_options()
    so.intra_op_num_threads = threads
    t = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t


def latencies_ms(sessions: dict, seq: int, runs: int, block: int = 10) -> dict:
    """Median ms per session over `runs` runs, taken in blocks of `block` consecutive runs (after 2 warm-up runs)
    with the sessions taking turns block by block: load from other processes on a shared machine falls on every
    variant alike, and one session's spinning worker threads do not compete with the next one's run."""
    feeds = {key: {sess.get_inputs()[0].name: torch.randint(0, 64, (1, seq)).numpy()} for key, sess in sessions.items()}
    times = {key: [] for key in sessions}
    for _ in range(-(-runs // block)):
        for key, sess in sessions.items():
            for i in range(block + 2):
                t = time.perf_counter()
                sess.run(None, feeds[key])
                if i >= 2:
                    times[key].append(time.perf_counter() - t)
    return {key: 1000 * statistics.median(ts) for key, ts in times.items()}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--seqs", default="1,32")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    from lowbit_compile.export.onnx import export_onnx, onnx_file_bytes

    from .common import machine, markdown_table, publish

    model = build_model(args.hidden, args.layers)
    seqs = [int(s) for s in args.seqs.split(",")]
    ids = torch.randint(0, 64, (2, 8))
    linears = {f: m for f, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_weights = sum(m.weight.numel() for m in linears.values())
    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        fpath = os.path.join(tmp, "float.onnx")
        export_float(model, ids, fpath)
        sessions["float32"], load_s = session(fpath, args.threads)
        rows["float32"] = ["float32", "MatMul", f"{onnx_file_bytes(fpath) / 1e6:.2f}", "32", f"{load_s:.2f}"]
        for name in args.variants.split(","):
            recipe, options = VARIANTS[name]
            recs = quantize(linears, recipe)
            path = os.path.join(tmp, f"{name.replace(':', '_')}.onnx")
            res = export_onnx(model, recs, (ids,), path, **options)
            sessions[name], load_s = session(path, args.threads)
            route = "; ".join(sorted(set(res.routes.values())))
            recipe_bits = sum(r.bits_per_weight() * r.in_features * r.out_features for r in recs.values())
            rows[name] = [name, route, f"{res.nbytes / 1e6:.2f}", f"{recipe_bits / n_weights:.2f}", f"{load_s:.2f}"]
        for s in seqs:
            lat = latencies_ms(sessions, s, args.runs)
            for name, row in rows.items():
                row.append(f"{lat[name]:.3f} ({lat['float32'] / lat[name]:.2f}×)")
    rows = list(rows.values())
    header = (["variant", "ONNX route", "file MB", "recipe bits/weight", "session s"]
              + [f"ms @ batch 1, seq {s} (speed-up)" for s in seqs])
    text = (f"onnxruntime CPU latency, tiny Llama (hidden {args.hidden}, {args.layers} layer(s), "
            f"{n_weights / 1e6:.2f} M linear weights), {args.threads} threads, median of {args.runs} runs "
            f"(variants in turns, blocks of 10); "
            f"{machine()}\n\n" + markdown_table(header, rows))
    return publish("onnx_latency", text)


if __name__ == "__main__":
    main()
