"""Shared pieces of the benchmarks: the real MiniLM, held-out sentences, the embedding metric, tables."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import torch

from lowbit_compile.data import stdlib_sentences
from lowbit_compile.demo import embed, load_minilm

OUT = os.environ.get("LOWBIT_BENCH_OUT", "bench-out")


def machine() -> str:
    """Architecture, cores, torch, threads, and the CPU capability every timing depends on (with the CPU kernel
    the integer layers take here: kernels/cpu_caps.py)."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {capability()}")


def capability() -> str:
    """'CPU capability AVX2 (integer layers: native kernels, avx2)'; ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA /
    LOWBIT_NATIVE_ISA emulate a smaller CPU (python -m bench --isa avx2)."""
    from lowbit_compile.kernels import cpu_caps, native

    kernel = cpu_caps.choose(4, 0).kernel
    isa = f", {native.capabilities()['selected']}" if kernel == "native" else ""
    return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (integer layers: {kernel} kernels{isa})"


def versions() -> str:
    """Versions of the packages besides torch (machine() names torch's)."""
    import importlib.metadata as md

    out = []
    for pkg in ("transformers", "lowbit-compile"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1-minute load average against the core count: the benchmarks share the machine with whatever runs."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                     before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round, so that a load spike
    on a shared machine hits every candidate alike and the ratios stay meaningful. `before` runs untimed ahead
    of every call (e.g. `flush_caches`, so each call starts cold whatever ran before it)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


_FLUSH: list[torch.Tensor] = []


def flush_caches(mb: int = 96) -> None:
    """Read a buffer larger than the last-level cache, so the next call finds its weights in memory, as a layer
    of a model larger than the cache does in every decode step."""
    if not _FLUSH:
        _FLUSH.append(torch.ones(mb << 18))
    _FLUSH[0].sum()


DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")


def update_doc(section: str, text: str, path: str = DOC) -> str:
    """Put `text` into docs/benchmarks.md between `<!-- bench:{section} -->` markers. A new section goes right after
    the last section of the same benchmark (`ops:AVX512` then `ops:AVX2`: the capabilities side by side), or at
    the end."""
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    doc = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc)
    else:
        base = section.split(":")[0]
        ends = list(re.finditer(r"<!-- /bench:" + re.escape(base) + r"(:[A-Za-z0-9_]+)? -->", doc))
        if ends:
            at = ends[-1].end()
            doc = doc[:at] + "\n\n" + block + doc[at:]
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)
    return path


def minilm_eval(n_heldout: int = 64):
    """(model, tokenizer, held-out batch, float reference embeddings)."""
    model, tok = load_minilm()
    held = dict(tok(stdlib_sentences("heldout", limit=n_heldout), padding=True, truncation=True, max_length=64,
                    return_tensors="pt"))
    with torch.no_grad():
        ref = embed(model, held)
    return model, tok, held, ref


def cosine_to_float(model, held, ref) -> float:
    with torch.no_grad():
        return float((embed(model, held) * ref).sum(-1).mean())


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def publish(name: str, text: str, doc: bool = False, by_isa: bool = False) -> str:
    """Print a benchmark's markdown, write it to bench-out/{name}.md and, with doc, into its `bench:{name}`
    section of docs/benchmarks.md; by_isa (timings): one section per CPU capability, `bench:{name}:AVX2` beside
    `bench:{name}:AVX512`, so a run on one kind of machine never overwrites the other's figures. Returns the
    text."""
    print(text)
    print("written to", write(f"{name}.md", text))
    if doc:
        print("updated", update_doc(f"{name}:{torch.backends.cpu.get_cpu_capability()}" if by_isa else name, text))
    return text


def write(name: str, text: str) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path
