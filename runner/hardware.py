"""GPU facts and live statistics from NVML; empty maps on a machine without one.

Each metric degrades on its own: NVML answers NotSupported for some queries on some devices
(utilization on a MIG-enabled GPU), and one such answer reports the schema's neutral value
("" or 0) rather than failing /hardware/info or /hardware/stats."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, TypeVar

import pynvml

log = logging.getLogger(__name__)
_init_lock = threading.Lock()
_initialised: bool | None = None
T = TypeVar("T")


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


def _each_gpu() -> Iterator[tuple[int, Any]]:
    """NVML index and handle of every GPU; one whose handle NVML refuses is left out."""
    if not _nvml():
        return
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        log.warning("NVML query failed: %s", exc)
        return
    for i in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        except pynvml.NVMLError as exc:
            log.warning("NVML has no handle for GPU %d: %s", i, exc)
            continue
        yield i, handle


def _query(fn: Callable[[Any], T], handle: Any, default: T) -> T:
    """One metric, or `default` when NVML cannot give it for this device: the caller's loop
    is outside `_each_gpu`'s reach, so each query guards itself."""
    try:
        return fn(handle)
    except pynvml.NVMLError as exc:
        log.debug("NVML %s: %s", getattr(fn, "__name__", fn), exc)
        return default


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _common(handle: Any) -> dict[str, Any]:
    """The fields GPUComputeInfo and GPUUtilizationInfo share."""
    mem = _query(pynvml.nvmlDeviceGetMemoryInfo, handle, None)
    return {
        "id": _text(_query(pynvml.nvmlDeviceGetUUID, handle, "")),
        "name": _text(_query(pynvml.nvmlDeviceGetName, handle, "")),
        "memory_total": int(mem.total) if mem else 0,
        "memory_free": int(mem.free) if mem else 0,
    }


def gpu_count() -> int:
    """GPUs the driver sees; cheap, and needs no torch import."""
    return sum(1 for _ in _each_gpu())


def gpu_info() -> dict[str, dict[str, Any]]:
    out = {}
    for i, handle in _each_gpu():
        major, minor = _query(pynvml.nvmlDeviceGetCudaComputeCapability, handle, (0, 0))
        out[str(i)] = {**_common(handle), "major": int(major), "minor": int(minor)}
    return out


def gpu_stats() -> dict[str, dict[str, Any]]:
    out = {}
    for i, handle in _each_gpu():
        util = _query(pynvml.nvmlDeviceGetUtilizationRates, handle, None)
        out[str(i)] = {**_common(handle),
                       "utilization_compute": int(util.gpu) if util else 0,
                       "utilization_memory": int(util.memory) if util else 0}
    return out


def _visible_entry(index: int) -> str | None:
    """CUDA_VISIBLE_DEVICES' entry for cuda:`index` (an NVML index or a GPU-/MIG- UUID), the
    index itself when unset, None when the variable hides that device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    return entries[index] if 0 <= index < len(entries) else None


def cuda_handle(index: int = 0) -> Any | None:
    """NVML's handle for torch's cuda:`index`, or None without NVML or such a device. Torch
    numbers only the devices CUDA_VISIBLE_DEVICES lists, in its order; NVML ignores it and
    numbers every GPU, so cuda:0 under CUDA_VISIBLE_DEVICES=2 is NVML's GPU 2."""
    entry = _visible_entry(index)
    if entry is None or not _nvml():
        return None
    try:
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    except pynvml.NVMLError as exc:
        log.debug("NVML has no device %r for cuda:%d: %s", entry, index, exc)
        return None


def cuda_info(index: int = 0) -> dict[str, Any] | None:
    """NVML's id, name and memory of torch's cuda:`index` (CUDA_VISIBLE_DEVICES applied), or
    None when NVML cannot say."""
    handle = cuda_handle(index)
    return None if handle is None else _common(handle)


def _cuda_memory(index: int) -> Any | None:
    handle = cuda_handle(index)
    return None if handle is None else _query(pynvml.nvmlDeviceGetMemoryInfo, handle, None)


def gpu_used(index: int = 0) -> int | None:
    """Bytes every process uses on torch's cuda:`index`, or None when NVML cannot say."""
    mem = _cuda_memory(index)
    return int(mem.used) if mem else None


def gpu_total(index: int = 0) -> int | None:
    """Bytes on torch's cuda:`index` (a MIG instance's own share), or None when NVML cannot
    say: the budget's device total."""
    mem = _cuda_memory(index)
    return int(mem.total) if mem else None


def torch_is_cpu_build() -> bool:
    """Whether the installed torch is a CPU-only wheel (local label `+cpu`, e.g. 2.13.0+cpu),
    read from its metadata: importing torch at start-up takes seconds. CUDA wheels carry
    `+cuXXX` or, from PyPI, no label."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False
    return version.partition("+")[2].split(".")[0] == "cpu"
