"""runner/heap.py: freed heap memory goes back to the system."""

from __future__ import annotations

import ctypes
import sys

import psutil
import pytest

from runner import heap

BLOCK = 64 << 10  # below glibc's mmap threshold: from the heap, kept there once freed
BLOCKS = 3200  # 200 MiB


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._libc() is None,
                    reason="glibc's malloc_trim")
def test_trim_returns_freed_heap_pages():
    libc = heap._libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # touched: resident
    for block in blocks[:-1]:  # the last one keeps the heap's top from shrinking by itself
        libc.free(block)
    process = psutil.Process()
    before = process.memory_info().rss
    assert heap.trim()
    after = process.memory_info().rss
    libc.free(blocks[-1])
    assert before - after > (BLOCK * BLOCKS) // 2, (before >> 20, after >> 20)
