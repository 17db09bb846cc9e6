"""Compile a Hugging Face causal LM with torch.compile(backend="lowbit").

A Llama from a small config stands in for a real checkpoint (no model hub here); with a real model use
AutoModelForCausalLM.from_pretrained(path). The recipe w4 is data-free (incoherence + RTN); w2-quip needs
calibration batches, which lb.quantize collects once, and the checkpoint is then reused by the backend.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit_compile as lb

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
model = LlamaForCausalLM(cfg).eval()
input_ids = torch.randint(0, 512, (1, 16))

with torch.no_grad():
    ref = model(input_ids).logits
    # 1. data-free: quantized while compiling
    fast = torch.compile(model, backend="lowbit", options={"recipe": "w4", "compiler": "eager"})
    logits = fast(input_ids).logits
    print(lb.last_report().table())
    print(f"w4: top-1 agreement with float {(logits.argmax(-1) == ref.argmax(-1)).float().mean():.2f}")

    # 2. QuIP at 2 bits: calibrate once, save, compile from the checkpoint
    calibration = [torch.randint(0, 512, (4, 32)) for _ in range(4)]
    ckpt = lb.quantize(model, "w2-quip", calibration, progress=False)
    ckpt.save("example-out/llama-w2")
    torch._dynamo.reset()
    fast = torch.compile(model, backend="lowbit", options={"checkpoint": "example-out/llama-w2",
                                                           "compiler": "eager"})
    logits = fast(input_ids).logits
    print(f"w2-quip: {ckpt.bits_per_weight():.3f} bits/weight, max |logit - float| "
          f"{(logits - ref).abs().max():.3f}")
