"""Crash-safe file writes and content fingerprints.

Every file lowbit-compile writes (checkpoints, exported .pte/.onnx programs, resume records) goes through
`atomic_write`: the data lands in a temporary file beside the target, is flushed to disk (fsync), and only
then renamed over the target (`os.replace`, atomic on POSIX and Windows), after which the directory entry is
synced too. A run killed at any moment leaves either the previous file or the new one, never a mix.

`fingerprint` hashes tensors and nested containers of them, so a resumed run can tell whether its inputs
(model weights, calibration batches, recipe) are the ones the stored work was done with.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

TMP_PREFIX = ".tmp-"


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (a saved checkpoint)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` (truncating it) and fsync the file: not atomic by itself."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same suffix); on a clean exit it is fsynced and renamed to
    `path`; on an exception it is deleted and `path` is untouched.

        with atomic_write("out/model.onnx") as tmp:
            onnx.save(model, tmp)

    The writer may create the temporary file itself or let this create it empty first (it exists on entry).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix="-" + path.name)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it without syncing
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_outputs(path: str | os.PathLike) -> Iterator[str]:
    """Like `atomic_write` for writers that put side files next to their output (ONNX external data):
    yield `<fresh temporary folder>/<name>`; on a clean exit every file in that folder is fsynced and moved
    beside `path`, side files first and `path` itself last, so the new main file never refers to data that
    is not there yet; on an exception the folder is deleted and nothing is touched.

    One gap remains where the side files keep their names: killed between moving a side file and the main
    file, the old main file sits beside the new side file. A single-file output has no such gap.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        yield os.path.join(tmp_dir, path.name)
        names = sorted(os.listdir(tmp_dir), key=lambda n: n == path.name)  # the main file last
        if path.name not in names:
            raise FileNotFoundError(f"the writer did not create {path.name} in {tmp_dir}")
        for name in names:
            with open(os.path.join(tmp_dir, name), "rb+") as f:
                os.fsync(f.fileno())
        for name in names:
            os.replace(os.path.join(tmp_dir, name), path.parent / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at `path` by `data` atomically (see `atomic_write`)."""
    with atomic_write(path) as tmp:
        write_synced(tmp, data)


# ----------------------------------------------------------------------------- fingerprints


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(("V" + repr(obj)).encode())
    else:  # an object whose repr may hold a memory address: only its type is stable across runs
        h.update(("O" + type(obj).__qualname__).encode())


def fingerprint(obj) -> str:
    """sha256 of tensors (dtype, shape and bytes) inside nested dicts, lists and tuples; numbers and strings
    by value; other objects by type only."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def tree_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, or of every file under a folder in sorted walk order: each file's name (without its
    folder, so a temporary directory's random name does not enter) and bytes. Two checkpoint folders or exported
    files are byte-identical when their digests are."""
    path = os.fspath(path)
    h = hashlib.sha256()
    walk = sorted(os.walk(path)) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]
    for root, _, files in walk:
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and values)."""
    return fingerprint(dict(model.state_dict(keep_vars=False)))
