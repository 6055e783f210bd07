"""Giving freed host memory back to the system.

glibc keeps what a process frees in its heaps (one arena per worker thread) for reuse, so a
runner's RSS climbs with the mix of requests it has served (decoded uploads, CPU tensors,
encoded answers) though nothing is held any more: the soak measured about 300 MiB/h of such
growth over a 1 GiB runner (docs/benchmarks.md). `trim()` hands the free pages back
(`malloc_trim`); the health loop calls it every probe. Where the C library has no
`malloc_trim` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Return the heaps' free pages to the system; True when some were. Blocking for a few
    milliseconds per GiB of heap: call it from a worker thread."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
