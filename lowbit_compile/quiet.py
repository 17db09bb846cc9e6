"""Known, harmless log lines of other libraries that a lowbit-compile run would otherwise print.

Importing a Hugging Face model class imports torchao when it is installed (transformers' quantizer registry),
and the ExecuTorch exporter imports it too. On a CPU-only build of torch, torchao then logs one "Failed to load
.../_C_mxfp8...so" warning per CUDA extension it ships, and torch's pytree logs a deprecation warning for every
Enum torchao registers with `register_constant()`; the exporters trigger a few more (KNOWN, KNOWN_WARNINGS).
None of them says anything about the user's model. `install()` (run when this module is imported, by
`import lowbit_compile`) drops exactly those records with a filter on the loggers that emit them (every other
record passes), and `known_warnings` wraps the exporters. `LOWBIT_VERBOSE=1` in the environment, the CLI's
`--verbose` and the backend option `verbose=True` keep (or bring back) everything: `uninstall()`. A model class
imported before lowbit_compile has already printed its lines; the ExecuTorch runtime's C++ cpuinfo lines on
stderr are not Python logging and stay.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings

# logger name -> the messages of it that are dropped
KNOWN = {
    "torchao": re.compile(r"^Failed to load .*\.so: "),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
    # torch.onnx's op registry, once per process: we export no torchvision ops
    "torch.onnx._internal.exporter._registration": re.compile(r"^torchvision is not installed\. Skipping"),
}
# Python warnings raised inside the libraries an exporter calls (ExecuTorch deep-copies pytree specs of the
# deprecated kind): (category, message pattern), ignored while `known_warnings()` is active
KNOWN_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # a record whose message cannot be formatted is not ours to judge
            return True


_FILTERS: dict[str, _DropKnown] = {}


def install() -> None:
    """Drop the known lines (idempotent); does nothing when LOWBIT_VERBOSE is set to a non-empty, non-0 value."""
    if os.environ.get("LOWBIT_VERBOSE", "") not in ("", "0"):
        return
    for name, pattern in KNOWN.items():
        if name not in _FILTERS:
            _FILTERS[name] = _DropKnown(pattern)
            logging.getLogger(name).addFilter(_FILTERS[name])


def known_warnings(fn):
    """Decorate an exporter: the KNOWN_WARNINGS raised while it runs are ignored, unless in verbose mode."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _FILTERS:  # verbose
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            for category, message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            return fn(*args, **kwargs)

    return wrapper


def uninstall() -> None:
    """Let every record through again (verbose mode)."""
    for name, f in _FILTERS.items():
        logging.getLogger(name).removeFilter(f)
    _FILTERS.clear()


install()
