"""runner/hardware.py against a fake NVML: metrics that degrade one by one, and torch's CUDA
index mapped to NVML's device (NVML ignores CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from runner import hardware
from runner.protocol import GPUComputeInfo, GPUUtilizationInfo

GIB = 1 << 30
UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
MIG = "MIG-dddd"  # a MIG instance on GPU 1, reachable only by UUID


class FakeNVML:
    """Three GPUs whose handles are their UUIDs; GPU n has n+1 GiB used of 80. `unsupported`
    names the queries that raise NotSupported, as utilization does on MIG-enabled GPUs."""

    def __init__(self):
        self.unsupported: set[str] = set()

    def _check(self, name: str) -> None:
        if name in self.unsupported:
            raise pynvml.NVMLError_NotSupported()

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(UUIDS):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return UUIDS[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in [*UUIDS, MIG]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return uuid

    def nvmlDeviceGetUUID(self, handle):
        self._check("uuid")
        return handle.encode()  # older bindings answer bytes

    def nvmlDeviceGetName(self, handle):
        self._check("name")
        return "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._check("memory")
        used = 7 * GIB if handle == MIG else (UUIDS.index(handle) + 1) * GIB
        total = 10 * GIB if handle == MIG else 80 * GIB
        return SimpleNamespace(total=total, free=total - used, used=used)

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        self._check("capability")
        return 9, 0

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._check("utilization")
        return SimpleNamespace(gpu=42, memory=17)


@pytest.fixture
def nvml(monkeypatch) -> FakeNVML:
    fake = FakeNVML()
    for name in dir(fake):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(fake, name))
    monkeypatch.setattr(hardware, "_initialised", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_stats_and_info_report_every_gpu(nvml):
    assert hardware.gpu_count() == 3
    stats = hardware.gpu_stats()["1"]
    assert stats == {"id": "GPU-bbbb", "name": "NVIDIA H100", "memory_total": 80 * GIB,
                     "memory_free": 78 * GIB, "utilization_compute": 42,
                     "utilization_memory": 17}
    assert hardware.gpu_info()["2"]["major"] == 9


def test_stats_on_a_mig_enabled_gpu_report_zero_utilization_and_real_memory(nvml):
    nvml.unsupported = {"utilization"}
    stats = hardware.gpu_stats()
    assert set(stats) == {"0", "1", "2"}
    assert stats["0"]["utilization_compute"] == stats["0"]["utilization_memory"] == 0
    assert stats["0"]["memory_total"] == 80 * GIB and stats["0"]["memory_free"] == 79 * GIB
    GPUUtilizationInfo(**stats["0"])  # the wire shape holds


def test_every_unsupported_metric_reports_the_schemas_neutral_value(nvml):
    nvml.unsupported = {"uuid", "name", "memory", "capability", "utilization"}
    info, stats = hardware.gpu_info()["0"], hardware.gpu_stats()["0"]
    assert GPUComputeInfo(**info) == GPUComputeInfo(id="", name="", memory_total=0,
                                                    memory_free=0, major=0, minor=0)
    assert GPUUtilizationInfo(**stats).utilization_compute == 0
    assert hardware.gpu_used(0) is None and hardware.gpu_total(0) is None


def test_hardware_stats_answers_200_on_a_mig_enabled_gpu(nvml, echo):
    nvml.unsupported = {"utilization"}
    r = echo.get("/hardware/stats")
    assert r.status_code == 200, r.text
    assert r.json()["gpu_stats"]["1"]["utilization_compute"] == 0
    assert echo.get("/hardware/info").status_code == 200


def test_without_nvml_there_is_nothing_to_report(monkeypatch):
    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    monkeypatch.setattr(hardware, "_initialised", None)
    assert hardware.gpu_count() == 0 and hardware.gpu_stats() == {}
    assert hardware.cuda_handle(0) is None and hardware.gpu_used(0) is None


@pytest.mark.parametrize(("visible", "index", "handle"), [
    (None, 0, "GPU-aaaa"),            # unset: torch's numbering is NVML's
    (None, 2, "GPU-cccc"),
    ("2", 0, "GPU-cccc"),             # cuda:0 is the first listed GPU
    ("2, 0", 1, "GPU-aaaa"),
    ("GPU-bbbb", 0, "GPU-bbbb"),      # UUIDs, as Kubernetes' device plugin sets them
    ("GPU-cccc,MIG-dddd", 1, MIG),
    ("1", 1, None),                   # hidden by the list
    ("", 0, None),                    # empty hides every GPU
    ("GPU-zzzz", 0, None),            # NVML knows no such device
    ("-1", 0, None),
    (None, 5, None),
])
def test_cuda_handle_honours_cuda_visible_devices(nvml, monkeypatch, visible, index, handle):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert hardware.cuda_handle(index) == handle


def test_our_gpus_memory_is_the_visible_devices(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert hardware.gpu_used(0) == 3 * GIB and hardware.gpu_total(0) == 80 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG)
    assert hardware.gpu_used(0) == 7 * GIB and hardware.gpu_total(0) == 10 * GIB


def test_cuda_memory_counts_others_on_the_visible_gpu(nvml, monkeypatch):
    import torch

    from runner.memory import CudaMemory

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert CudaMemory(0).others() == 2 * GIB


def test_the_budget_is_the_runners_own_gpu_or_mig_slice(nvml, monkeypatch, tmp_path):
    from runner.registry import Registry
    from runner.service import Service
    from runner.settings import REPO_ROOT, Settings

    def budget() -> int:
        settings = Settings(pipeline="text-to-image", device="cuda", tiny=False,
                            model_dir=tmp_path, vram_reserve=GIB)
        return Service(settings, Registry.load(REPO_ROOT / "models.yaml"), {}).models._budget()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG)
    assert budget() == 9 * GIB  # the slice's 10 GiB, not the whole card's 80
    nvml.unsupported.add("memory")  # NVML cannot say: CUDA's own figure
    monkeypatch.setattr("runner.device.cuda_total", lambda index: 24 * GIB)
    assert budget() == 23 * GIB
    monkeypatch.setattr("runner.device.cuda_total", lambda index: None)
    assert budget() > 0  # nor can CUDA (no driver): host RAM, as without a GPU


def test_the_live_runner_registration_names_the_visible_gpu(nvml, monkeypatch):
    # What runner/live.py sends as `gpu`: torch's cuda:0 is NVML's GPU 2 here.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert hardware.cuda_info(0) == {"id": UUIDS[2], "name": "NVIDIA H100",
                                     "memory_total": 80 * GIB, "memory_free": 77 * GIB}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert hardware.cuda_info(0) is None
