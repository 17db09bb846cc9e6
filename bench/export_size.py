"""Size of ExecuTorch .pte files: fp32, ours at 2/3/4 bits and FP4 (W4A4), and torchao's 8da4w (int8 dynamic
activations × int4 weights through XNNPACK) for reference, on a Llama-shaped model and the real all-MiniLM-L6-v2.

Bits per quantized weight are measured against the fp32 file of the same model, lowered the same way:
    bits = 32 − 8·(fp32 bytes − file bytes) / quantized weights
so everything a quantized file adds or saves (codes, scales, sign vectors, Hadamard blocks, the unpack
instructions) is charged to the quantized weights. Quantized: every linear except the output head (lm_head)
and MiniLM's pooler, which stay float32 in every variant. Our weights: data-free RTN with incoherence
(w2/w3/w4 per output channel), and the `fp4` recipe (LLM-FP4 search, W4A4 with per-channel exponents) through
lb.quantize, calibrated on a few batches; the numbers are sizes, not quality. "recipe bits" is what the records
store (codes, scales, signs, exponents) per quantized weight. "error" is the exporter's own check: max
|pte − PyTorch quantized model| / max |reference| on the example inputs. A W4A4 row with "n rounding flips" matched
the reference at float tolerance once n activations that sit on an FP4 rounding midpoint were rounded the other
way (lowbit_compile/export/fp4_flips.py); its "error" is against the reference without them.

    python -m bench.export_size [--quick]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch

import lowbit_compile as lb
from lowbit_compile.export.executorch import export_pte, max_rel_error, run_pte
from lowbit_compile.quantize.layer import quantize_weight
from lowbit_compile.recipe import parse_spec

from .common import machine, markdown_table, publish

SKIP = r"(^|.*\.)(lm_head|pooler\..*)$"


def llama(layers: int = 4, hidden: int = 512, mlp: int = 1376, vocab: int = 2048, heads: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, vocab, (4, 32), generator=g) for _ in range(2)]
    return model, (torch.randint(0, vocab, (1, 16)),), calibration


def minilm():
    from lowbit_compile.data import stdlib_sentences
    from lowbit_compile.demo import load_minilm
    from lowbit_compile.pipeline import tokenize

    model, tok = load_minilm()
    enc = tok(["ExecuTorch runs the packed weights.", "a short one"], padding=True, return_tensors="pt")
    calibration = tokenize(tok, stdlib_sentences("calibration", limit=32), batch_size=16, max_length=64)
    return model, (enc["input_ids"], enc["attention_mask"]), calibration


def quantized_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not re.fullmatch(SKIP, n)}


def torchao_8da4w(model, inputs, path: Path) -> float:
    """torchao's Int8DynamicActivationIntxWeightConfig(int4, per channel) lowered to XNNPACK, written to `path`;
    returns the file's error against torchao's quantized model in PyTorch."""
    import copy

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_

    q = copy.deepcopy(model)
    if hasattr(getattr(q, "config", None), "use_cache"):
        q.config.use_cache = False
    names = set(quantized_linears(q))
    quantize_(q, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0)),
              filter_fn=lambda m, fqn: fqn in names)
    with torch.no_grad():
        ep = torch.export.export(q, inputs)
        ref = [t for t in torch.utils._pytree.tree_leaves(q(*inputs)) if isinstance(t, torch.Tensor)]
    path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return max_rel_error(run_pte(path, inputs), ref)


def forward_ms(path: Path, inputs, repeats: int = 5) -> float:
    """Mean executorch.runtime forward time after one warm-up call."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    method.execute(list(inputs))
    t = time.perf_counter()
    for _ in range(repeats):
        method.execute(list(inputs))
    return (time.perf_counter() - t) / repeats * 1e3


def recipe_bits(records, n: int) -> str:
    return f"{sum(r.bits_per_weight() * r.in_features * r.out_features for r in records.values()) / n:.2f}"


def measure(label: str, model, inputs, calibration, out_dir: Path) -> list[list]:
    lins = quantized_linears(model)
    n = sum(m.weight.numel() for m in lins.values())
    rows = []

    def row(variant, path, seconds, err, fp32, stored=""):
        nbytes = path.stat().st_size
        bits = 32 - 8 * (fp32 - nbytes) / n
        rows.append([label, variant, f"{nbytes:,}", f"{nbytes / 2**20:.2f}", f"{bits:.2f}", stored,
                     "" if err is None else f"{err:.1e}", f"{forward_ms(path, inputs):.1f}", f"{seconds:.0f}"])
        print(rows[-1], flush=True)

    def ours(recipe, records, seconds=0.0):
        t = time.perf_counter()
        res = export_pte(model, records, inputs, out_dir / f"{label}-{recipe}.pte", dynamic_shapes=None)
        routes = "/".join(sorted(set(res.routes.values())))
        n_flips = len(res.rounding_flips)
        flips = f", {n_flips} rounding flip{'s' if n_flips > 1 else ''}" if n_flips else ""
        row(f"ours {recipe} ({routes}{flips})", res.path, seconds + time.perf_counter() - t, res.error, fp32,
            recipe_bits(records, n))

    t = time.perf_counter()
    res = export_pte(model, {}, inputs, out_dir / f"{label}-fp32.pte", dynamic_shapes=None)
    fp32 = res.nbytes
    row("fp32", res.path, time.perf_counter() - t, None, fp32)
    for recipe in ("w2", "w3", "w4"):
        ours(recipe, {k: quantize_weight(k, m.weight, parse_spec(recipe)) for k, m in lins.items()})
    t = time.perf_counter()
    ck = lb.quantize(model, "fp4", calibration, overrides={f"re:{SKIP}": None}, progress=False)
    assert set(ck.records) == set(lins), "the FP4 checkpoint must quantize the same linears"
    ours("fp4", ck.records, time.perf_counter() - t)  # export s includes the FP4 search
    t = time.perf_counter()
    path = out_dir / f"{label}-8da4w.pte"
    err = torchao_8da4w(model, inputs, path)
    row("torchao 8da4w (int4 per channel, XNNPACK)", path, time.perf_counter() - t, err, fp32)
    return rows, n


def main(argv=None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the Llama-shaped model with 2 layers only")
    args = ap.parse_args(argv)
    models = [("llama-512x1376x2" if args.quick else "llama-512x1376x4",
               lambda: llama(layers=2 if args.quick else 4))]
    if not args.quick:
        models.append(("all-MiniLM-L6-v2", minilm))
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in models:
            model, inputs, calibration = build()
            r, n = measure(label, model, inputs, calibration, Path(tmp))
            rows += r
            notes.append(f"{label}: {n:,} quantized weights")
    header = ["model", "file", "bytes", "MiB", "bits / quantized weight", "recipe bits", "error", "forward ms",
              "export s"]
    text = "\n".join([
        "## ExecuTorch .pte size\n",
        f"Machine: {machine()}. Static shapes, XNNPACK partitioner, executorch.runtime checks every file; "
        "forward ms: one call on the example inputs (Llama: 1 × 16 tokens, MiniLM: 2 short sentences), mean of 5 "
        "after a warm-up.\n",
        "Bits per quantized weight = 32 − 8·(fp32 bytes − file bytes) / quantized weights "
        f"({'; '.join(notes)}).\n",
        markdown_table(header, rows),
    ])
    return publish("export_size", text)


if __name__ == "__main__":
    main()
