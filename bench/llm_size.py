"""Whole-model size of the real decoder SmolLM2-135M-Instruct: the checkpoint, the ExecuTorch .pte and the ONNX file,
with the token embedding (49 152 × 576, tied to the output head: 21 % of the parameters) quantized too, beside the
float32 files and llama.cpp's GGUF file the model ships as.

Recipe: every block linear at `--recipe` (default `w4`: the bytes of `w4-quip` are the same, since both store int4
codes, one float16 scale per output row and the two sign vectors; `w4` needs no calibration, so this runs in
minutes), the embedding at `--embedding` (default `w4-rtn-g32`: unrotated int4, one scale per 32 values, since a
gathered row cannot be un-rotated), and the tied head reads the embedding's record. "checkpoint" is the saved
folder (records + JSON); the float parameters the model keeps (norms) are in the model's own files and are counted
in the .pte / .onnx, which are self-contained. ".pte" is exported with `--int4` (default "xnnpack-load": int4 layers
on XNNPACK's kernel, and the tied head's XNNPACK weight rebuilt at load from the embedding's table, so the file holds
the table once; it loads with export.executorch.load_pte_method; "xnnpack" gives a file a plain runtime loads, with
the table twice), ".onnx" with the default routes (MatMulNBits). Each file is verified by its exporter against the
PyTorch quantized model on one prompt.

    python -m bench.llm_size [--recipe w4] [--embedding w4-rtn-g32] [--int4 xnnpack-load] [--no-export]
                             [--formats .pte,.onnx]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from .common import load_average, machine, markdown_table, publish, versions


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w4")
    ap.add_argument("--embedding", default="w4-rtn-g32", help="the embedding's recipe ('none' keeps it float)")
    ap.add_argument("--int4", default="xnnpack-load", help="export_pte's int4 for the .pte ('xnnpack' stores the tied "
                                                           "table twice, but a plain runtime loads the file)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--formats", default=".pte,.onnx", help="which exports (the .pte of SmolLM2 takes long: "
                                                             "XNNPACK lowers 30 blocks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import lowbit_compile as lb
    from lowbit_compile.evaluate import text_chunks
    from lowbit_compile.export import export
    from lowbit_compile.hf import load_smollm2, smollm2_path
    from lowbit_compile.io import tree_bytes

    loaded = load_smollm2()
    model, tok = loaded.model.eval(), loaded.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    overrides = {} if args.embedding == "none" else {"model.embed_tokens": args.embedding}
    calib = None
    if lb.Recipe.parse(args.recipe).needs_calibration:
        calib = list(text_chunks(tok, "calibration", max_chunks=32, min_tokens=256).split(4))
    t = time.perf_counter()
    ck = lb.quantize(model, args.recipe, calib, overrides=overrides, progress=False)
    quant_s = time.perf_counter() - t
    rows = [["float32 parameters (PyTorch)", f"{n_params * 4 / 2**20:.1f}", "32.00", "", ""],
            ["GGUF file it ships as (llama.cpp Q4_1 etc.)", f"{os.path.getsize(smollm2_path()) / 2**20:.1f}",
             f"{8 * os.path.getsize(smollm2_path()) / n_params:.2f}", "", ""]]
    with tempfile.TemporaryDirectory() as tmp:
        ck.save(os.path.join(tmp, "ck"))
        ck_bytes = tree_bytes(os.path.join(tmp, "ck"))
        rows.append(["lowbit checkpoint (records + JSON)", f"{ck_bytes / 2**20:.1f}", f"{8 * ck_bytes / n_params:.2f}",
                     "100%", ""])
        if not args.no_export:
            ids = torch.tensor([tok("def quantize(model):", add_special_tokens=False)["input_ids"]])
            for suffix, kw in ((".pte", {"dynamic_shapes": None, "int4": args.int4}), (".onnx", {})):
                if suffix not in args.formats.split(","):
                    continue
                t = time.perf_counter()
                res = export(model, ck, (ids,), os.path.join(tmp, "model" + suffix), **kw)
                nbytes, export_s = res.nbytes, time.perf_counter() - t
                print(f"{suffix}: {nbytes:,} bytes in {export_s:.0f} s", flush=True)
                how = f", int4={args.int4}" if suffix == ".pte" else ""
                rows.append([f"{suffix} (self-contained: norms and graph included{how})", f"{nbytes / 2**20:.1f}",
                             f"{8 * nbytes / n_params:.2f}", f"{nbytes / ck_bytes:.0%}", f"{export_s:.0f}"])
    emb = ck.records.get("model.embed_tokens")
    blocks = [r for k, r in ck.records.items() if k not in ("model.embed_tokens", "lm_head")]
    block_bits = (sum(r.bits_per_weight() * r.in_features * r.out_features for r in blocks)
                  / sum(r.in_features * r.out_features for r in blocks))
    text = "\n".join([
        "## Whole-model size: SmolLM2-135M-Instruct\n",
        f"`python -m bench.llm_size --recipe {args.recipe} --embedding {args.embedding} --int4 {args.int4} "
        f"--formats {args.formats}`. "
        f"{machine()}; {versions()}; "
        f"{load_average()}. {n_params / 1e6:.1f} M parameters; block linears `{args.recipe}` "
        f"({block_bits:.3f} bits per weight as stored), embedding "
        f"{'float32' if emb is None else f'`{args.embedding}` ({emb.bits_per_weight():.3f} bits per weight)'}, "
        f"tied head sharing it; quantized in {quant_s:.0f} s. Bits = 8 × bytes / all parameters.\n",
        markdown_table(["artifact", "MiB", "bits / parameter", "vs checkpoint", "export s"], rows),
    ])
    return publish("llm_size", text)


if __name__ == "__main__":
    main()
