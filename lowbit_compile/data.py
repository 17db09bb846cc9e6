"""English text that needs no download: sentences from the Python standard library's docstrings.

Deterministic: a fixed module list, sentences in a fixed order, split by a stable hash into a calibration
part and a held-out part, so calibration and evaluation never share a sentence.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "html", "http.client",
    "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "os", "pathlib", "pickle", "pprint",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(module_name: str):
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return
    yield inspect.getdoc(mod) or ""
    for name in sorted(vars(mod)):
        obj = getattr(mod, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == module_name:
            yield inspect.getdoc(obj) or ""


def _sentences():
    seen = set()
    for m in MODULES:
        for doc in _docstrings(m):
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if not text or ">>>" in text or "::" in text:
                    continue
                for s in _SENTENCE.split(text):
                    words = s.split()
                    if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and s not in seen:
                        seen.add(s)
                        yield s


def stdlib_sentences(split: str = "calibration", limit: int | None = None) -> list[str]:
    """Sentences of one split: "calibration" (about 80%) or "heldout" (about 20%)."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    out = []
    for s in _sentences():
        bucket = hashlib.sha256(s.encode()).digest()[0] % 5
        if (bucket == 0) == (split == "heldout"):
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    return out
