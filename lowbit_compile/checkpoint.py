"""QuantizedLinear: everything needed to run one quantized linear, and to reproduce it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import formats, hadamard
from .kernels import reference
from .quantize.incoherence import Transform


@dataclass
class QuantizedLinear:
    fqn: str
    method: str  # "rtn", ...
    bits: int
    in_features: int
    out_features: int
    group_size: int
    qweight: torch.Tensor  # uint8, (out_features, packed_length(in_features, bits))
    scales: torch.Tensor  # float16, (out_features, groups)
    seed: int | None  # transform seed; None when not rotated
    su: torch.Tensor | None  # float32 ±1 (in_features,)
    sv: torch.Tensor | None  # float32 ±1 (out_features,)
    weight_error: float  # ||Ŵ - W||_F / ||W||_F
    proxy_loss: float | None = None  # tr((Ŵ-W) H (Ŵ-W)ᵀ) when a Hessian was available

    @property
    def fmt(self) -> str:
        return f"int{self.bits}"

    @property
    def rotated(self) -> bool:
        return self.su is not None

    def transform(self) -> Transform | None:
        if self.su is None:
            return None
        return Transform(self.su, self.sv, hadamard.factor(self.in_features),
                         hadamard.factor(self.out_features) if self.sv is not None else None)

    def rotated_weight(self) -> torch.Tensor:
        return reference.dequantize_weight(self.qweight, self.scales, self.bits, self.in_features,
                                           self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer applies to un-rotated inputs (Uᵀ Ŵ' V): the float reference."""
        w = self.rotated_weight()
        t = self.transform()
        return w if t is None else t.unrotate_weight(w)

    def bits_per_weight(self) -> float:
        """Codes + float16 scales + one bit per sign, as stored."""
        sign_bits = (0 if self.su is None else self.in_features) + (0 if self.sv is None else self.out_features)
        return formats.bits_per_weight(formats.int_format(self.bits), self.in_features, self.out_features,
                                       self.group_size, sign_bits)


# ----------------------------------------------------------------------------- the checkpoint

FORMAT_VERSION = 1
TENSORS_FILE = "lowbit.safetensors"
META_FILE = "lowbit.json"
_RECORD_TENSORS = ("qweight", "scales", "su", "sv")
_RECORD_FIELDS = ("method", "bits", "in_features", "out_features", "group_size", "seed", "weight_error",
                  "proxy_loss")


@dataclass
class Checkpoint:
    """All quantized linears of a model plus how they were made. Saved as safetensors + versioned JSON."""

    records: dict  # fqn -> QuantizedLinear
    recipe: str = ""
    seed: int = 0
    plan: list = None  # one dict per linear: fqn, shape, format or "float", reason
    calibration: dict = None
    meta: dict = None

    def __post_init__(self):
        self.plan = self.plan or []
        self.calibration = self.calibration or {}
        self.meta = self.meta or {}

    def bits_per_weight(self) -> float:
        """Average over every linear in the plan, float layers counted at 32 bits."""
        total = bits = 0.0
        for p in self.plan:
            n = p["shape"][0] * p["shape"][1]
            rec = self.records.get(p["fqn"])
            total += n
            bits += n * (rec.bits_per_weight() if rec is not None else 32.0)
        return bits / total if total else 0.0

    def table(self) -> str:
        from .report import LayerReport, Report

        rep = Report()
        for p in self.plan:
            rec = self.records.get(p["fqn"])
            shape = tuple(p["shape"])
            if rec is None:
                rep.layers.append(LayerReport(p["fqn"], shape, "float", reason=p.get("reason", "")))
            else:
                rep.layers.append(LayerReport(p["fqn"], shape, "quantized", p.get("spec", rec.fmt),
                                              rec.bits_per_weight(), rec.weight_error))
        return rep.table()

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, path: str) -> str:
        import hashlib
        import json
        import os

        from safetensors.torch import save

        os.makedirs(path, exist_ok=True)
        tensors = {}
        records = {}
        for fqn, rec in self.records.items():
            for name in _RECORD_TENSORS:
                t = getattr(rec, name)
                if t is not None:
                    tensors[f"{fqn}.{name}"] = t.contiguous()
            records[fqn] = {k: getattr(rec, k) for k in _RECORD_FIELDS}
        blob = save(tensors)
        meta = {
            "format_version": FORMAT_VERSION,
            "recipe": self.recipe,
            "seed": self.seed,
            "records": records,
            "plan": self.plan,
            "calibration": self.calibration,
            "meta": {**self.meta, "versions": _versions()},
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }
        _atomic_write(os.path.join(path, TENSORS_FILE), blob)
        _atomic_write(os.path.join(path, META_FILE), json.dumps(meta, indent=1, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        import hashlib
        import json
        import os

        from safetensors.torch import load

        from .errors import LowbitError

        meta_path, tensor_path = os.path.join(path, META_FILE), os.path.join(path, TENSORS_FILE)
        if not os.path.exists(meta_path) or not os.path.exists(tensor_path):
            raise LowbitError(f"{path} is not a lowbit checkpoint: expected {META_FILE} and {TENSORS_FILE} "
                              f"(written by lb.quantize(...).save(path))")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged: re-run "
                              f"quantization") from None
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LowbitError(f"{path}: checkpoint format version {version} is newer than this lowbit-compile "
                              f"understands ({FORMAT_VERSION}); upgrade lowbit-compile")
        with open(tensor_path, "rb") as f:
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise LowbitError(f"{tensor_path}: checksum mismatch: the file is truncated or was modified after "
                              f"it was saved; re-run quantization or restore the file")
        tensors = load(blob)
        records = {}
        for fqn, fields in meta["records"].items():
            parts = {name: tensors.get(f"{fqn}.{name}") for name in _RECORD_TENSORS}
            records[fqn] = QuantizedLinear(fqn=fqn, **fields, **parts)
        return cls(records=records, recipe=meta.get("recipe", ""), seed=meta.get("seed", 0),
                   plan=meta.get("plan"), calibration=meta.get("calibration"), meta=meta.get("meta"))


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: an interrupted write leaves the old file."""
    import os
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("lowbit-compile", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
