"""Every pipeline's CUDA-only branches, run on the CPU: the runner believes it has a GPU
(half precision, fused attention, channels_last, autocast, the float32-kept upscaler VAE...)
while every tensor stays on the CPU. No GPU machine runs in CI, so this is where a dtype or
branch mistake of the GPU path shows first; `pytest -m gpu` then runs the same on a real one."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from runner import device as devices
from runner import lifecycle as service_module
from runner.app import create_app
from runner.footprint import walk
from runner.memory import HostMemory
from runner.settings import Settings
from runner.spec import discover
from tests.conftest import wait_ready
from tests.gpu.support import ALL_PIPELINES, ANSWER_KEY, resident, small_request

HALF = (torch.float16, torch.bfloat16)
# Those installed here: text-to-speech has its own environment (`make test` runs this file
# there too).
PIPELINES = [p for p in ALL_PIPELINES if p in discover()]


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    monkeypatch.setattr(devices.Device, "torch", property(lambda self: torch.device("cpu")))
    monkeypatch.setattr(service_module, "CudaMemory", lambda index=0: HostMemory())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_cuda_path_serves(cuda_on_cpu, pipeline, tiny_dir):
    settings = Settings(pipeline=pipeline, device="cuda", tiny=True, tiny_dir=tiny_dir,
                        health_probe_seconds=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert wait_ready(client) == "IDLE"
        entry, model = resident(client, pipeline)
        assert client.app.state.service.device.is_cuda
        if entry.dtype in ("float16", "bfloat16"):  # the half precision is really in use
            dtypes = {p.dtype for m in walk(model) if isinstance(m, torch.nn.Module)
                      for p in m.parameters()}
            assert dtypes & set(HALF), dtypes
        response = small_request(client, pipeline)
        assert response.status_code == 200, response.text
        assert ANSWER_KEY[pipeline] in response.json()
