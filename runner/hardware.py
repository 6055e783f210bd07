"""GPU facts and live statistics from NVML; empty maps on a machine without one."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pynvml

log = logging.getLogger(__name__)
_init_lock = threading.Lock()
_initialised: bool | None = None


def _nvml() -> bool:
    global _initialised
    with _init_lock:
        if _initialised is None:
            try:
                pynvml.nvmlInit()
                _initialised = True
            except pynvml.NVMLError as exc:
                log.info("NVML unavailable (%s): no GPU facts to report", exc)
                _initialised = False
        return _initialised


def _each_gpu():
    if not _nvml():
        return
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            yield i, pynvml.nvmlDeviceGetHandleByIndex(i)
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed: %s", exc)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpu_count() -> int:
    """GPUs the driver sees; cheap, and needs no torch import."""
    return sum(1 for _ in _each_gpu())


def gpu_info() -> dict[str, dict[str, Any]]:
    out = {}
    for i, handle in _each_gpu():
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        out[str(i)] = {
            "id": _text(pynvml.nvmlDeviceGetUUID(handle)),
            "name": _text(pynvml.nvmlDeviceGetName(handle)),
            "memory_total": int(mem.total), "memory_free": int(mem.free),
            "major": int(major), "minor": int(minor),
        }
    return out


def gpu_stats() -> dict[str, dict[str, Any]]:
    out = {}
    for i, handle in _each_gpu():
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        out[str(i)] = {
            "id": _text(pynvml.nvmlDeviceGetUUID(handle)),
            "name": _text(pynvml.nvmlDeviceGetName(handle)),
            "memory_total": int(mem.total), "memory_free": int(mem.free),
            "utilization_compute": int(util.gpu), "utilization_memory": int(util.memory),
        }
    return out


def gpu_used(index: int = 0) -> int | None:
    """Bytes in use on GPU `index` by every process, or None without NVML."""
    for i, handle in _each_gpu():
        if i == index:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    return None
