"""Resuming an interrupted lb.quantize: the finished units (one repeated block, then the linears outside the blocks)
kept in a work folder, and what a resumed run must share with the run that wrote it."""

from __future__ import annotations

import logging

import torch

from .checkpoint import Checkpoint
from .errors import LowbitError
from .recipe import Recipe

log = logging.getLogger("lowbit_compile")


def recipe_spec(rec: Recipe) -> dict:
    """The recipe in full (default spec, overrides, seed), JSON-ready."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(rec)))


def run_identity(model: torch.nn.Module, rec: Recipe, batches, sequential: bool,
                 model_sha256: str | None = None) -> dict:
    """What decides a run's results: a resumed run must match the run that wrote the work_dir in all of it.
    model_sha256: the model's fingerprint when its weights are not in memory (a streamed folder's files)."""
    from .checkpoint import FORMAT_VERSION, _versions
    from .io import fingerprint, model_fingerprint

    versions = _versions()
    return {"recipe": recipe_spec(rec), "sequential": bool(sequential) if batches is not None else None,
            "calibration_sha256": None if batches is None else fingerprint(batches),
            "model_sha256": model_sha256 or model_fingerprint(model), "format_version": FORMAT_VERSION,
            "versions": {k: versions.get(k) for k in ("torch", "lowbit-compile")}}


class WorkDir:
    """The finished units of one lb.quantize run: `run.json` (what the run depends on) and `units/<unit>/`
    (a small checkpoint per unit: its records and plan entries), each written atomically when the unit
    finishes. A unit whose files are missing or damaged is simply quantized again."""

    RUN_FILE = "run.json"

    def __init__(self, path, identity: dict):
        import json
        import os

        from .io import atomic_write_bytes

        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        run_path = os.path.join(self.path, self.RUN_FILE)
        if os.path.exists(run_path):
            try:
                with open(run_path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            if old != identity:
                differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise LowbitError(f"work_dir {self.path} holds the finished blocks of a different run (it differs in: "
                                  f"{', '.join(differ)}); use another or an empty work_dir, or delete {self.path} "
                                  f"to start over")
        else:
            atomic_write_bytes(run_path, json.dumps(identity, indent=1, sort_keys=True).encode())

    def _unit_dir(self, unit: str) -> str:
        import os

        return os.path.join(self.path, "units", unit)

    def load(self, unit: str):
        """(records, plan entries) of a finished unit, or None."""
        import os

        from .checkpoint import META_FILE

        d = self._unit_dir(unit)
        if not os.path.exists(os.path.join(d, META_FILE)):
            return None
        try:
            ck = Checkpoint.load(d)
        except LowbitError as e:
            log.warning("lowbit: the stored unit %s in %s is damaged (%s); quantizing it again", unit, self.path, e)
            return None
        return ck.records, ck.plan

    def save(self, unit: str, records: dict, plan: list) -> None:
        Checkpoint(records=records, plan=list(plan)).save(self._unit_dir(unit))
