"""Handing freed memory back to the system between the steps of a large table's work (screening a manifest).

Three allocators serve one screening: Arrow's (mimalloc) for the columns, glibc's malloc for numpy arrays, and
Python's for its objects. Each keeps what a step freed for its own later use, which the other two cannot take, so
without a release each step's high point adds to the next one's instead of being reused (measured on a
500,000-row screening: ~40% of its peak).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import pyarrow as pa


def heap_trimmer() -> Callable[[], object]:
    """glibc's malloc_trim(0) where it exists (Linux), else a no-op: the C heap's freed pages handed back (the codec's
    clips of ever-different lengths fragment it too: data/tokenize.py)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim_heap = heap_trimmer()


def release_unused_memory() -> None:
    """Return what Arrow's pool and the C heap hold freed to the system (milliseconds; nothing live is touched)."""
    pa.default_memory_pool().release_unused()
    _trim_heap()
