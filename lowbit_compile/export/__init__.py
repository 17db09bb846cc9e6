"""Export quantized models to deployment formats: ExecuTorch `.pte` (executorch.py) and ONNX (onnx.py).

`export(model, records_or_checkpoint, example_inputs, path, **kw)` picks the exporter by the file suffix and returns
its ExportResult (export/inputs.py; a PteExport for .pte). The exporters are imported lazily: ExecuTorch and ONNX are
optional dependencies, and a missing one is named with its install command.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from ..errors import LowbitError

EXPORTERS = {".pte": ("executorch", "export_pte"), ".onnx": ("onnx", "export_onnx")}


def export(model, records_or_checkpoint, example_inputs, path, **kw):
    """Export `model` with its quantized linears to `path`: `.pte` → ExecuTorch, `.onnx` → ONNX.

    Keyword arguments go to the exporter (`executorch.export_pte`, `onnx.export_onnx`). Returns its ExportResult.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORTERS:
        raise LowbitError(f"cannot export to {str(path)!r}: unknown suffix {suffix!r}; valid suffixes: "
                          f"{', '.join(EXPORTERS)}")
    module_name, func_name = EXPORTERS[suffix]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as e:
        raise LowbitError(f"the {suffix} exporter needs the package {e.name!r}: pip install "
                          f"'lowbit-compile[{'edge' if suffix == '.pte' else 'onnx'}]'") from e
    func = getattr(module, func_name)
    with _no_kv_cache(model):
        return func(model, records_or_checkpoint, example_inputs, path, **kw)


@contextlib.contextmanager
def _no_kv_cache(model):
    """Hugging Face causal LMs return a KV-cache object by default, which neither torch.export's output
    flattening nor the runtimes take: export the stateless forward (use_cache=False), then restore the flag."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


from .inputs import ExportResult  # noqa: E402

__all__ = ["EXPORTERS", "ExportResult", "export"]
