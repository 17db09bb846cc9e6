"""What happened to each linear: quantized (format, bits/weight, error) or kept in float, and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerReport:
    fqn: str
    shape: tuple[int, int]
    status: str  # "quantized" | "float"
    spec: str = ""
    bits_per_weight: float = 32.0
    weight_error: float | None = None
    reason: str = ""
    cached: bool = False
    runtime: str = ""  # the op the rewritten graph runs and the bits per weight it holds in memory


@dataclass
class Report:
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: dict = field(default_factory=dict, repr=False)  # fqn -> QuantizedLinear
    rewritten: int = 0  # lowbit ops in the rewritten graph

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status != "quantized"]

    def average_bits(self) -> float:
        """Bits per weight over all reported linears, float ones counted at 32 (as stored in the model)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        if not total:
            return 0.0
        return sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in self.layers) / total

    def table(self) -> str:
        runtime = any(r.runtime for r in self.layers)
        rows = [("layer", "shape", "format", "bits/w", "rel.err") + (("runtime",) if runtime else ()) + ("note",)]
        for r in self.layers:
            rows.append((
                r.fqn, f"{r.shape[0]}x{r.shape[1]}", r.spec if r.status == "quantized" else "float",
                f"{r.bits_per_weight:.3f}", "" if r.weight_error is None else f"{r.weight_error:.4f}",
                *((r.runtime,) if runtime else ()),
                ("cached" if r.cached else "") if r.status == "quantized" else r.reason,
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (f"{len(self.quantized)} linear(s) quantized, {len(self.kept_float)} kept in float; "
                   f"average {self.average_bits():.3f} bits/weight over linear weights")
        return "\n".join(lines + [summary] + self.notes)
