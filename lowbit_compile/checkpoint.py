"""The Checkpoint: the records of a model's quantized linears (quantize/records.py) plus how they were made, saved
crash-safe as safetensors + versioned JSON, and matched to the model or graph they are applied to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .quantize.records import RECORD_KINDS, FP4QuantizedLinear, QuantizedLinear, weight_digest

__all__ = ["Checkpoint", "FP4QuantizedLinear", "QuantizedLinear", "RECORD_KINDS", "weight_digest", "FORMAT_VERSION"]


# ----------------------------------------------------------------------------- the checkpoint

# 2: records carry a "kind" ("int" or "fp4"); version-1 files (integer records only) still load.
# 3: a record may serve two layers (a quantized embedding and its tied head): the second holds {"shares": fqn}.
# 4: integer and E8 records may hold a "bias" tensor (bias correction), applied instead of the model's bias; an
#    older lowbit-compile would drop it, so it refuses version 4. Versions 1-3 still load (no record has a bias).
FORMAT_VERSION = 4
TENSORS_FILE = "lowbit.safetensors"
META_FILE = "lowbit.json"


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
        """Average over every linear in the plan, float layers counted at 32 bits (embeddings are not linears:
        the file's size counts them, this does not)."""
        total = bits = 0.0
        for p in self.plan:
            if p.get("module") == "embedding":
                continue
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
        """Write `lowbit.safetensors` + `lowbit.json` into the folder `path`, crash-safe.

        Both files are first written in full and fsynced as `.lowbit.safetensors.new` / `.lowbit.json.new`,
        then renamed over the old ones, tensors first. Killed before the first rename: the old checkpoint is
        intact. Killed between the renames: `load` finds the new tensors, whose checksum the pending
        `.lowbit.json.new` holds, and completes the save (roll forward). The JSON carries the sha256 of the
        tensors file and of its own content, so any truncation or edit is detected on load.
        """
        from safetensors.torch import save

        from .io import fsync_dir, write_synced

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tensors = {}
        records = {}
        first: dict[int, str] = {}  # id(record) -> the first name it is saved under
        for fqn, rec in self.records.items():
            if id(rec) in first:  # one record for two layers (a tied embedding and head): stored once
                records[fqn] = {"shares": first[id(rec)]}
                continue
            first[id(rec)] = fqn
            for name in rec.TENSORS:
                t = getattr(rec, name)
                if t is not None:
                    tensors[f"{fqn}.{name}"] = t.contiguous()
            records[fqn] = {"kind": rec.kind, **{k: getattr(rec, k) for k in rec.FIELDS}}
        blob = save(tensors)
        meta = {
            "format_version": FORMAT_VERSION,
            "recipe": self.recipe,
            "seed": self.seed,
            "records": records,
            "plan": self.plan,
            "calibration": self.calibration,
            "meta": {**self.meta, "versions": _versions()},
            "tensors_sha256": _sha256(blob),
        }
        meta["meta_sha256"] = _sha256(_meta_text(meta).encode())
        t_path, m_path = os.path.join(path, TENSORS_FILE), os.path.join(path, META_FILE)
        write_synced(_pending(t_path), blob)
        write_synced(_pending(m_path), _meta_text(meta).encode())
        os.replace(_pending(t_path), t_path)
        os.replace(_pending(m_path), m_path)
        fsync_dir(path)
        return path

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        """Read a checkpoint folder; refuses (LowbitError) a missing, truncated, modified or newer one."""
        from safetensors.torch import load

        from .errors import LowbitError

        path = os.fspath(path)
        meta_path, tensor_path = os.path.join(path, META_FILE), os.path.join(path, TENSORS_FILE)
        if not os.path.exists(meta_path) or not os.path.exists(tensor_path):
            raise LowbitError(f"{path} is not a lowbit checkpoint: expected {META_FILE} and {TENSORS_FILE} "
                              f"(written by lb.quantize(...).save(path))")
        meta = _read_meta(meta_path)
        with open(tensor_path, "rb") as f:
            blob = f.read()
        digest = _sha256(blob)
        if digest != meta.get("tensors_sha256"):
            pending = _pending_meta(meta_path, digest)
            if pending is None:
                raise LowbitError(f"{tensor_path}: checksum mismatch: the file is truncated or was modified after "
                                  f"it was saved; re-run quantization or restore the file")
            meta = pending  # a save was interrupted between its two renames: finish it
            try:
                os.replace(_pending(meta_path), meta_path)
            except OSError:  # a read-only folder: the checkpoint still loads from the pending file
                pass
        try:
            tensors = load(blob)
        except Exception as e:  # a checksum-valid blob that safetensors refuses: not written by save()
            raise LowbitError(f"{tensor_path}: not a valid safetensors file ({e})") from None
        records, shared = {}, {}
        for fqn, fields in meta["records"].items():
            fields = dict(fields)
            if "shares" in fields:
                shared[fqn] = fields["shares"]
                continue
            kind = fields.pop("kind", "int")
            if kind not in RECORD_KINDS:
                raise LowbitError(f"{path}: layer {fqn} has record kind {kind!r}, which this lowbit-compile does "
                                  f"not know (known: {sorted(RECORD_KINDS)}); upgrade lowbit-compile")
            record_cls = RECORD_KINDS[kind]
            parts = {name: tensors.get(f"{fqn}.{name}") for name in record_cls.TENSORS}
            try:
                records[fqn] = record_cls(fqn=fqn, **fields, **parts)
            except TypeError as e:
                raise LowbitError(f"{path}: layer {fqn}: the record does not match the {kind!r} record layout "
                                  f"({e}); the checkpoint was written by an incompatible lowbit-compile") from None
        for fqn, owner in shared.items():
            if owner not in records:
                raise LowbitError(f"{path}: layer {fqn} shares the record of {owner}, which the checkpoint does not "
                                  f"hold; the checkpoint is damaged")
            records[fqn] = records[owner]
        return cls(records=records, recipe=meta.get("recipe", ""), seed=meta.get("seed", 0),
                   plan=meta.get("plan"), calibration=meta.get("calibration"), meta=meta.get("meta"))

    # -- matching a model ----------------------------------------------------------------------------------

    def differences(self, linears: Mapping[str, tuple[int, int]], whole_model: bool = True,
                    must_match: Iterable[str] = ()) -> list[str]:
        """How this checkpoint disagrees with a model whose linears are {fqn: (out_features, in_features)}.

        Always: a record whose layer has another shape, and no linear of the model known to the checkpoint.
        With `whole_model`: records naming no linear of the model, and linears the checkpoint's plan never
        saw. For a part of a model (one graph of several after graph breaks) pass whole_model=False: then
        only the linears in `must_match` (nn.Linear modules, which lb.quantize always plans) must be known.
        An empty list: they match.
        """
        diffs = []
        for fqn, rec in self.records.items():
            shape = linears.get(fqn)
            if shape is not None and tuple(shape) != (rec.out_features, rec.in_features):
                diffs.append(f"{fqn}: the model's weight is {shape[0]}x{shape[1]}, the checkpoint's "
                             f"{rec.out_features}x{rec.in_features}")
            elif shape is None and whole_model:
                diffs.append(f"{fqn}: in the checkpoint, but not a linear of this model")
        known = {p["fqn"] for p in self.plan} | set(self.records)
        if self.plan:
            check = linears if whole_model else [f for f in must_match if f in linears]
            diffs += [f"{fqn}: a linear of this model that the checkpoint does not know" for fqn in check
                      if fqn not in known]
        if linears and known and not known & set(linears):
            diffs.append("no linear of this model is in the checkpoint (compile or export the module the checkpoint "
                         "was made from, e.g. the whole model rather than model.model)")
        return diffs

    def check(self, linears: Mapping[str, tuple[int, int]], whole_model: bool = True,
              must_match: Iterable[str] = (), where: str = "this model", tried: Iterable[str] = ()) -> None:
        """Raise a LowbitError listing every difference (see `differences`) when the checkpoint does not fit;
        `tried` (from `match`) says how the names were matched."""
        from .errors import LowbitError

        diffs = self.differences(linears, whole_model, must_match)
        if diffs:
            shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
            how = f"\nlayers matched {'; '.join(tried)}" if tried else ""
            raise LowbitError(f"the checkpoint (recipe {self.recipe!r}) belongs to another model than {where}; "
                              f"{len(diffs)} difference(s):\n  {shown}{how}\nquantize this model with "
                              f"lb.quantize(model, ...) or use the checkpoint made for it")

    def match(self, linears: Mapping[str, tuple[int, int]], weight=None) -> tuple[dict[str, str], list[str]]:
        """Which checkpoint layer each linear {name: (out_features, in_features)} of a graph is, for names that
        may be spelled differently from the model the checkpoint was made of (a wrapper module adds a prefix, a
        function that calls two models qualifies names by the model's variable). Tried in order:

        1. the same name (a layer of the plan or a record);
        2. the one layer of the same shape whose name ends the linear's name at a dot, or is ended by it;
        3. `weight(name)` (the linear's float weight, when given) whose `weight_digest` equals a record's.

        Returns ({linear name: checkpoint name} for the linears it found, one line per step saying what it
        matched). Linears not found keep their own name for `check` to report.
        """
        shapes = {p["fqn"]: tuple(p["shape"]) for p in self.plan}
        shapes.update({f: (r.out_features, r.in_features) for f, r in self.records.items()})
        found, by_suffix, by_digest = {}, {}, {}
        for name in linears:
            if name in shapes:
                found[name] = name
        taken = set(found.values())
        for name, shape in linears.items():
            if name in found:
                continue
            cands = [c for c, s in shapes.items() if c not in taken and tuple(s) == tuple(shape)
                     and (name.endswith("." + c) or c.endswith("." + name) or not c or not name)]
            if len(cands) == 1:
                by_suffix[name] = cands[0]
        taken |= set(by_suffix.values())
        digests: dict[str, list[str]] = {}
        for f, r in self.records.items():
            if r.weight_sha256 and f not in taken:
                digests.setdefault(r.weight_sha256, []).append(f)
        if weight is not None and digests:
            for name in linears:
                if name in found or name in by_suffix:
                    continue
                hit = digests.get(weight_digest(weight(name)), [])
                if len(hit) == 1 and hit[0] not in by_digest.values():
                    by_digest[name] = hit[0]
        tried = [f"by name: {len(found)}",
                 f"by the name's ending and the shape: {len(by_suffix)}",
                 f"by the weight's content (sha256): {len(by_digest)}" if weight is not None and digests else
                 "by the weight's content: not tried (" + ("no weights given" if weight is None else
                                                            "the checkpoint stores no weight digests") + ")"]
        return {**found, **by_suffix, **by_digest}, tried

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse (LowbitError, every difference listed) a checkpoint made for another model."""
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        shapes.update({n: (m.num_embeddings, m.embedding_dim) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Embedding) and n in self.records})
        self.check(shapes, where=type(model).__name__)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _meta_text(meta: dict) -> str:
    import json

    return json.dumps(meta, indent=1, sort_keys=True)


def _pending(path: str) -> str:
    """The journal name of a file being saved: `.name.new` beside it."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.new")


def _read_meta(meta_path: str) -> dict:
    import json

    from .errors import LowbitError

    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{meta_path} is not valid JSON ({e}); the checkpoint is truncated or damaged: re-run "
                          f"quantization or restore the file") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("records"), dict):
        raise LowbitError(f"{meta_path} is not a lowbit checkpoint description (no 'records' table)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LowbitError(f"{os.path.dirname(meta_path) or '.'}: checkpoint format version {version} is newer than "
                          f"this lowbit-compile understands ({FORMAT_VERSION}); upgrade lowbit-compile")
    stored = meta.get("meta_sha256")  # absent in files saved before the metadata had a checksum
    if stored is not None and version >= 2:  # version 1 files never had one: a claimed version 1 is not checked
        body = {k: v for k, v in meta.items() if k != "meta_sha256"}
        if _sha256(_meta_text(body).encode()) != stored:
            raise LowbitError(f"{meta_path}: checksum mismatch: the file was modified after it was saved; re-run "
                              f"quantization or restore the file")
    return meta


def _pending_meta(meta_path: str, tensors_digest: str) -> dict | None:
    """The metadata of an interrupted save whose new tensors file is already in place, if that is the case."""
    from .errors import LowbitError

    pending = _pending(meta_path)
    if not os.path.exists(pending):
        return None
    try:
        meta = _read_meta(pending)
    except LowbitError:
        return None
    return meta if meta.get("tensors_sha256") == tensors_digest else None


def _versions() -> dict:
    """The versions that decide the bytes of a checkpoint: a rerun with these reproduces it exactly."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("lowbit-compile", "transformers", "numpy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
