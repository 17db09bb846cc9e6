"""How close a quantized causal LM is to its float model: perplexity of both, and the mean per-token
KL(float ‖ quantized) of their next-token distributions, on held-out English text that needs no download.

Text: the standard library's docstring sentences of one split (data.stdlib_sentences: calibration and held-out
never share a sentence), joined into one running text, tokenized once and cut into chunks of `chunk_tokens`
tokens (every token of a chunk but the first is predicted with the chunk before it as context). Perplexity is
exp(mean negative log-likelihood) over all predicted tokens; KL is averaged over the same positions:

    KL(p‖q) = Σ_v p_v (log p_v − log q_v),   p = softmax(float logits), q = softmax(quantized logits)

computed in float64 from log-softmax, so it is ≥ 0 up to rounding and exactly 0 for identical logits.
"""

from __future__ import annotations

import math

import torch

from .errors import LowbitError

CHUNK_TOKENS = 256


def text_chunks(tokenizer, split: str = "heldout", chunk_tokens: int = CHUNK_TOKENS, min_tokens: int = 4096,
                max_chunks: int | None = None) -> torch.Tensor:
    """(chunks, chunk_tokens) token ids of the split's sentences as one running text: as many whole chunks as the
    split has, at least enough for min_tokens predicted tokens (an error otherwise), at most max_chunks."""
    from .data import stdlib_sentences

    text = " ".join(stdlib_sentences(split))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // chunk_tokens
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n * (chunk_tokens - 1) < min_tokens:
        raise LowbitError(f"the {split!r} text has {ids.numel()} tokens: too few for {min_tokens} predicted tokens in "
                          f"chunks of {chunk_tokens}")
    return ids[: n * chunk_tokens].view(n, chunk_tokens)


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    kwargs = {"attention_mask": mask} if mask is not None else {}
    out = model(input_ids=ids, use_cache=False, **kwargs)
    return (out.logits if hasattr(out, "logits") else out[0]).to(torch.float64)


@torch.no_grad()
def causal_lm_quality(float_model, quant_model, batches, progress: bool = False) -> dict:
    """Perplexity of both models, mean KL(float ‖ quantized) per predicted token and the share of positions where
    both predict the same token, over `batches`: a (chunks, tokens) tensor of ids (cut into batches of 4), or a
    list of dicts with input_ids (and attention_mask; padded positions are not predicted)."""
    if isinstance(batches, torch.Tensor):
        batches = [{"input_ids": batches[i:i + 4]} for i in range(0, len(batches), 4)]
    nll_f = nll_q = kl = 0.0
    tokens = agree = 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="evaluating", unit="batch")
    for b in it:
        ids, mask = b["input_ids"], b.get("attention_mask")
        lf = torch.log_softmax(_logits(float_model, ids, mask)[:, :-1], -1)
        lq = torch.log_softmax(_logits(quant_model, ids, mask)[:, :-1], -1)
        target = ids[:, 1:]
        keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        nll_f -= float(lf.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum())
        nll_q -= float(lq.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum())
        kl += float((lf.exp() * (lf - lq)).sum(-1)[keep].sum())
        agree += int((lf.argmax(-1) == lq.argmax(-1))[keep].sum())
        tokens += int(keep.sum())
    if tokens == 0:
        raise LowbitError("no token to predict: give texts of at least two tokens")
    return {"tokens": tokens, "perplexity_float": math.exp(nll_f / tokens),
            "perplexity_quantized": math.exp(nll_q / tokens), "kl": kl / tokens, "top1_agreement": agree / tokens}


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one user message through the tokenizer's chat template (plain text without
    one), stopping at the end-of-sequence token."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        ids = enc["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def decode_step(model, prompt_len: int = 64):
    """step(m): one decode step of `m` (the model or a compiled form of it) after a `prompt_len`-token prompt that
    `model` prefilled once, against a fresh copy of that cache, so every call has the same shapes (one
    compilation) and times exactly one generated token. Returns the step's logits."""
    import copy

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step(m):
        c = copy.deepcopy(cache)  # outside the op time it costs microseconds; keeps every call's shapes equal
        with torch.no_grad():
            return m(tok, past_key_values=c, use_cache=True).logits

    return step
