"""Shared pieces of the benchmarks: the real MiniLM, held-out sentences, the embedding metric, tables."""

from __future__ import annotations

import os
import platform

import torch

from lowbit_compile.data import stdlib_sentences
from lowbit_compile.demo import embed, load_minilm

OUT = os.environ.get("LOWBIT_BENCH_OUT", "bench-out")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def minilm_eval(n_heldout: int = 64):
    """(model, tokenizer, held-out batch, float reference embeddings)."""
    model, tok = load_minilm()
    held = dict(tok(stdlib_sentences("heldout", limit=n_heldout), padding=True, truncation=True, max_length=64,
                    return_tensors="pt"))
    with torch.no_grad():
        ref = embed(model, held)
    return model, tok, held, ref


def cosine_to_float(model, held, ref) -> float:
    with torch.no_grad():
        return float((embed(model, held) * ref).sum(-1).mean())


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write(name: str, text: str) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path
