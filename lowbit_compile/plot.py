"""PNG plots for mixed precision (matplotlib, Agg backend, imported only when a plot is asked for)."""

from __future__ import annotations

import os

from .errors import LowbitError


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise LowbitError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_plan(report: dict, path: str) -> str:
    """A mixed-precision plan in its JSON form (mixed.PlanReport.as_dict(), checkpoint.meta["mixed"]): per linear,
    the bits per weight the plan gave it (bars, coloured by format) over the loss the solver saw for each candidate
    (log scale); per block: LIM and ZD. Returns the path."""
    plt = _pyplot()
    rows = report["rows"]
    if not rows:
        raise LowbitError("the plan has no layers to plot")
    fig, (ax_bits, ax_loss, ax_block) = plt.subplots(3, 1, figsize=(max(8, 0.28 * len(rows) + 3), 10),
                                                     gridspec_kw={"height_ratios": [2, 2.6, 1.3]},
                                                     layout="constrained")
    x = range(len(rows))
    formats = sorted({r["format"] for r in rows})
    colors = {f: plt.cm.viridis(i / max(1, len(formats) - 1)) for i, f in enumerate(formats)}
    ax_bits.bar(x, [r["bits_per_weight"] for r in rows], color=[colors[r["format"]] for r in rows])
    ax_bits.axhline(report["target_bpw"], color="red", ls="--", lw=1, label=f"target {report['target_bpw']}")
    ax_bits.axhline(report["bits_per_weight"], color="black", ls=":", lw=1,
                    label=f"reached {report['bits_per_weight']:.3f}")
    for f in formats:
        ax_bits.bar([0], [0], color=colors[f], label=f)
    ax_bits.set_ylabel("bits / weight (stored)")
    ax_bits.set_title(f"mixed precision plan: unit={report['unit']}, loss={report['loss']}")
    ax_bits.legend(fontsize=8, ncol=len(formats) + 2, loc="upper left")
    ax_bits.set_ylim(0, max(r["bits_per_weight"] for r in rows) * 1.3)
    for c in report["candidates"]:
        ax_loss.plot(x, [r["losses"].get(c) or float("nan") for r in rows], "o-", ms=3, label=c)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel(f"{report['loss']} loss (solver's)")
    ax_loss.legend(fontsize=8)
    short = [_short(r["fqn"].removeprefix(_common_prefix([r["fqn"] for r in rows]))) for r in rows]
    for ax in (ax_bits, ax_loss):
        ax.set_xticks(list(x))
        ax.set_xlim(-0.6, len(rows) - 0.4)
        for i in range(1, len(rows)):  # block boundaries
            if rows[i]["block"] != rows[i - 1]["block"]:
                ax.axvline(i - 0.5, color="grey", lw=0.6, alpha=0.5)
    ax_bits.set_xticklabels([])
    ax_loss.set_xticklabels(short, rotation=90, fontsize=7)
    ax_loss.set_xlabel("linear (block boundaries in grey)")
    blocks = list(report["lim"] or report["zd"])
    if blocks:
        bx = range(len(blocks))
        ax_block.plot(bx, [report["lim"].get(b, float("nan")) for b in blocks], "o-", label="LIM (1 − cos in/out)")
        ax_block.set_ylabel("LIM")
        ax_z = ax_block.twinx()
        ax_z.plot(bx, [report["zd"].get(b, float("nan")) for b in blocks], "s--", color="tab:orange",
                  label="ZD (share |z| > 1)")
        ax_z.set_ylabel("ZD")
        ax_block.set_xticks(list(bx))
        ax_block.set_xticklabels(blocks, fontsize=8)
        ax_block.legend(loc="upper left", fontsize=8)
        ax_z.legend(loc="upper center", fontsize=8)
    else:
        ax_block.set_axis_off()
    return _save(fig, path)


def plot_checkpoint(ckpt, path: str) -> str:
    """A checkpoint's plan: the mixed-precision plot when it has one (meta["mixed"]), otherwise bits per linear
    and, when calibration recorded it, LIM per block. Returns the path."""
    mixed = (ckpt.meta or {}).get("mixed")
    if mixed:
        return plot_plan(mixed, path)
    plan = list(ckpt.plan)
    if not plan:
        raise LowbitError("the checkpoint has no layers to plot")
    plt = _pyplot()
    lim = (ckpt.calibration or {}).get("lim") or {}
    fig, axes = plt.subplots(2 if lim else 1, 1, figsize=(max(8, 0.28 * len(plan) + 3), 7 if lim else 4.5),
                             layout="constrained", squeeze=False)
    ax = axes[0][0]
    bits = [ckpt.records[p["fqn"]].bits_per_weight() if p["fqn"] in ckpt.records else 32.0 for p in plan]
    colors = ["tab:blue" if p["fqn"] in ckpt.records else "tab:grey" for p in plan]
    ax.bar(range(len(plan)), bits, color=colors)
    ax.set_ylabel("bits / weight (stored; float = 32, grey)")
    ax.set_title(f"recipe {ckpt.recipe}: {ckpt.bits_per_weight():.3f} bits/weight over linear weights")
    names = [p["fqn"] for p in plan]
    prefix = _common_prefix(names)
    ax.set_xticks(range(len(plan)))
    ax.set_xticklabels([_short(n.removeprefix(prefix)) for n in names], rotation=90, fontsize=7)
    if lim:
        bx = axes[1][0]
        blocks = list(lim)
        bx.plot(range(len(blocks)), [lim[b] for b in blocks], "o-", label="LIM (1 − cos in/out)")
        bx.set_xticks(range(len(blocks)))
        bx.set_xticklabels(blocks, fontsize=8)
        bx.set_ylabel("LIM")
        bx.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(curves: dict, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Line plot of {label: (xs, ys)}; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, "o-", ms=4, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


_ABBREVIATIONS = (("attention.self.", "attn."), ("attention.output.dense", "attn.out"), ("attention", "attn"),
                  ("intermediate.dense", "ffn.in"), ("output.dense", "ffn.out"), ("self_attn.", ""), ("mlp.", ""))


def _short(name: str) -> str:
    for long, short in _ABBREVIATIONS:
        name = name.replace(long, short)
    return name


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
