"""sha256 of the checkpoints (and, with --export, the exported .pte/.onnx files) the test models give for fixed seeds:
run on two commits to show a restructuring changed no byte.

    OMP_NUM_THREADS=1 python tools/hash_artifacts.py [--export] > hashes-A.txt   # on commit A
    ... check out commit B ...
    OMP_NUM_THREADS=1 python tools/hash_artifacts.py [--export] > hashes-B.txt
    diff hashes-A.txt hashes-B.txt

The checkpoint JSON records tool versions, so both runs must use the same environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

# This checkout's package and test models, not an installed (editable) lowbit_compile from another checkout: the
# script run from a worktree of commit B must hash commit B.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

CHECKPOINTS = [  # (model, recipe, overrides)
    ("llama", "w4", None), ("llama", "w3-rtn-g64", {"re:.*down_proj": "w3-rtn"}), ("llama", "w2-quip", None),
    ("llama", "w4-optq", None),
    ("llama", "fp4", None), ("llama", "fp4-rot", None), ("llama", "w4a16-fp4", None), ("llama", "2.5bpw", None),
    ("llama", "w4", {"lm_head": "w4", "re:.*down_proj": "w8"}), ("qwen2", "w3-quip", None), ("opt", "w4", None),
    ("minilm2", "w2-quip", None), ("minilm2", "3.25bpw", None), ("minilm2", "fp4", None),
]
EXPORTS = [("llama", "w2", ".pte"), ("llama", "w4", ".pte"), ("llama", "fp4", ".pte"), ("llama", "w2", ".onnx"),
           ("llama", "w4", ".onnx"), ("llama", "fp4-rot", ".onnx")]


def model_of(name):
    from tinymodels import minilm, tiny_llama, tiny_opt, tiny_qwen2

    if name == "llama":
        return tiny_llama(), 320
    if name == "qwen2":
        return tiny_qwen2(), 320
    if name == "opt":
        return tiny_opt(), 320
    model, _ = minilm()
    model.encoder.layer = model.encoder.layer[:2]
    return model, model.config.vocab_size


def calibration(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (4, 32), generator=g) for _ in range(2)]


def digest(path: str) -> str:
    from lowbit_compile.io import tree_digest

    return tree_digest(path)[:20]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", action="store_true", help="also export .pte / .onnx files and hash them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import lowbit_compile as lb

    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, recipe, overrides) in enumerate(CHECKPOINTS):
            model, vocab = model_of(name)
            ck = lb.quantize(model, recipe, calibration(vocab), overrides=overrides, seed=0, progress=False)
            out = ck.save(os.path.join(tmp, f"ck{i}"))
            print(f"checkpoint {name} {recipe} {overrides or ''}: {digest(out)}", flush=True)
        if args.export:
            for name, recipe, suffix in EXPORTS:
                model, vocab = model_of(name)
                model.config.use_cache = False
                ck = lb.quantize(model, recipe, calibration(vocab), seed=0, progress=False)
                path = os.path.join(tmp, f"{name}-{recipe}{suffix}")
                lb.export(model, ck, (torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1)),),
                          path)
                print(f"export {name} {recipe} {suffix}: {digest(path)}", flush=True)


if __name__ == "__main__":
    main()
