"""Handing freed heap pages back to the OS after quantizing (glibc malloc_trim; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

TRIM_SLACK = 256 << 20  # trim after a layer once RSS grew this much since the last trim (release_freed_memory)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (other platforms and C libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have none
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_rss_after_trim = 0


def release_freed_memory(slack: int = 0) -> None:
    """Give the heap pages freed by quantization back to the OS (glibc only; a no-op elsewhere); with slack,
    only once RSS has grown by that many bytes since the last trim (a trimmed page costs a page fault when
    the next layer's temporaries reuse it).

    Quantizing a layer allocates and frees weight-sized float temporaries (rotation, clipping search, error
    check, packing). glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), so after
    the first layer these temporaries come from the brk heap, and the small results allocated between them
    fragment it: the freed pages stay in the process, ~100 MB per Llama layer (1.1 GB for the 8-layer, 640 MB
    bench model), and glibc never returns them. malloc_trim(0) releases every free page of the heap; nothing
    live moves, so numerics are untouched."""
    global _rss_after_trim
    trim = _malloc_trim()
    if trim is None:
        return
    if slack and _rss_bytes() - _rss_after_trim < slack:
        return
    trim(0)
    _rss_after_trim = _rss_bytes()
