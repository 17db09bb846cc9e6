"""Hugging Face models on disk: load a `save_pretrained` folder, make example inputs, measure quality.

Used by the `lowbit` command (quantize / export / eval) and the demo. A checkpoint made by `lowbit quantize`
records the model folder and class in `meta["source"]`, so later commands find the float model again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .errors import LowbitError

EXAMPLE_TEXTS = ("Quantization keeps the model small.", "A second, slightly longer example sentence for shapes.")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    causal: bool  # a causal LM (logits over the vocabulary); otherwise an encoder (hidden states)
    path: str

    @property
    def source(self) -> dict:
        """What `meta["source"]` stores."""
        return {"path": self.path, "class": "AutoModelForCausalLM" if self.causal else "AutoModel"}


def load_pretrained(path: str) -> Loaded:
    """A transformers model and its tokenizer from a local folder (no network)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise LowbitError("loading a model folder needs transformers: pip install 'lowbit-compile[hf]'") from e
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LowbitError(f"{path} is not a transformers model folder (no config.json); pass a folder written by "
                          f"model.save_pretrained(...)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); save it beside the "
                          f"model with tokenizer.save_pretrained(...)") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return Loaded(model.eval(), tok, causal, path)


def load_source(ckpt) -> Loaded:
    """The float model a checkpoint was made from (`meta["source"]`, written by `lowbit quantize`)."""
    src = (ckpt.meta or {}).get("source") or {}
    if not src.get("path"):
        raise LowbitError("this checkpoint does not say which model it was made from (no meta['source']); "
                          "make it with `lowbit quantize MODEL_DIR ...`, or export from Python with lb.export(model, "
                          "checkpoint, example_inputs, path)")
    if not os.path.isdir(src["path"]):
        raise LowbitError(f"the checkpoint's model folder {src['path']} does not exist any more; restore it or "
                          f"quantize again")
    return load_pretrained(src["path"])


def batch(tokenizer, texts, max_length: int = 64) -> dict:
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def example_inputs(loaded: Loaded) -> dict:
    """Keyword inputs for export: two short sentences (batch 2, a few tokens), as the tokenizer makes them."""
    b = batch(loaded.tokenizer, EXAMPLE_TEXTS, max_length=32)
    return {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def read_texts(path: str | None, limit: int = 64) -> list[str]:
    """Non-empty lines of a text file, or held-out standard-library sentences when path is None."""
    if path is None:
        from .data import stdlib_sentences

        return stdlib_sentences("heldout", limit=limit)
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise LowbitError(f"cannot read the text file {path}: {e.strerror}") from e
    if not texts:
        raise LowbitError(f"{path} has no non-empty lines; give one sentence or paragraph per line")
    return texts[:limit]


def embed(model, b: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean pooling, L2 normalized."""
    out = model(**b)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _nll(logits: torch.Tensor, b: dict) -> tuple[float, int]:
    ids, mask = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return float(-(lp * mask).sum()), int(mask.sum())


@torch.no_grad()
def compare(float_model, quant_model, tokenizer, texts, causal: bool, batch_size: int = 16) -> dict:
    """Quality of `quant_model` against `float_model` on `texts`.

    Encoders: mean cosine of the sentence embeddings (1.0 = identical). Causal LMs: perplexity of both on the
    texts, and the share of positions where both predict the same next token."""
    cos, n, nll_f, nll_q, tokens, agree = 0.0, 0, 0.0, 0.0, 0, 0
    for i in range(0, len(texts), batch_size):
        b = batch(tokenizer, texts[i:i + batch_size])
        if not causal:
            cos += float((embed(float_model, b) * embed(quant_model, b)).sum(-1).sum())
            n += len(texts[i:i + batch_size])
            continue
        lf, lq = float_model(**b).logits, quant_model(**b).logits
        a, t = _nll(lf, b)
        nll_f, tokens = nll_f + a, tokens + t
        nll_q += _nll(lq, b)[0]
        mask = b["attention_mask"].bool()
        agree += int(((lf.argmax(-1) == lq.argmax(-1)) & mask).sum())
        n += int(mask.sum())
    if not causal:
        return {"texts": len(texts), "embedding_cosine": cos / n}
    return {"texts": len(texts), "tokens": tokens, "perplexity_float": math.exp(nll_f / tokens),
            "perplexity_quantized": math.exp(nll_q / tokens), "top1_agreement": agree / n}
