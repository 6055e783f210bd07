"""Every pipeline's tiny checkpoint through the whole HTTP path on CUDA, at the serving dtype
of its models.yaml entry (float16 / bfloat16), with the cache's byte counts checked against
what torch holds on the device."""

from __future__ import annotations

import pytest

from runner.spec import discover
from tests.gpu.conftest import HAS_PARLER, NO_PARLER
from tests.gpu.support import (
    ALL_PIPELINES,
    ANSWER_KEY,
    FLOAT32_PARTS,
    check_estimate,
    cuda_app,
    device_bytes,
    half_share,
    models,
    on_cpu,
    release_cuda,
    resident,
    small_request,
    stages,
)

pytestmark = pytest.mark.gpu
SERVED = discover()
# The tiny SAM2 snapshot is a sam2_video model, mostly the memory modules that the image
# model never loads (0.7 MiB on disk, 0.24 MiB loaded); real snapshots are 95 % image model.
LOWEST_RATIO = {"segment-anything-2": 0.25}


def servable(pipeline: str) -> None:
    if pipeline == "text-to-speech" and not HAS_PARLER:
        pytest.skip(NO_PARLER)
    if pipeline not in SERVED:
        pytest.skip(f"{pipeline} cannot be served from this environment")


@pytest.fixture(scope="module")
def tiny_cuda_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models-cuda")


@pytest.mark.parametrize("pipeline", ALL_PIPELINES)
def test_tiny_model_serves_on_cuda_in_half_precision(pipeline, tiny_cuda_dir):
    import torch

    servable(pipeline)
    with cuda_app(pipeline, tiny=True, tiny_dir=tiny_cuda_dir) as client:
        entry, model = resident(client, pipeline)
        assert on_cpu(model) == [], f"parameters left off the GPU in {on_cpu(model)}"
        dtype = getattr(torch, entry.dtype)
        assert half_share(model, dtype, FLOAT32_PARTS.get(pipeline, ())) >= 0.95, (
            f"{entry.id} is not served in {entry.dtype}")

        r = small_request(client, pipeline)
        assert r.status_code == 200, r.text
        assert ANSWER_KEY[pipeline] in r.json()
        timing = stages(r)
        assert "model" in timing and len(timing) >= 2, timing
        assert all(ms >= 0 for ms in timing.values())
        assert client.get("/version").json()["mode"] == "tiny"


@pytest.mark.parametrize("pipeline", ALL_PIPELINES)
def test_cache_bytes_match_the_device(pipeline, tiny_cuda_dir):
    """GET /models' estimated bytes (safetensors headers) against its measured bytes (the
    loaded tensors), and both against what torch's allocator holds after the warm-up."""
    import torch

    servable(pipeline)
    release_cuda()
    before = torch.cuda.memory_allocated()
    with cuda_app(pipeline, tiny=True, tiny_dir=tiny_cuda_dir) as client:
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        described = models(client)
        held = 0
        for name, info in described.items():
            assert info["state"] == "ready" and info["measured_bytes"] is not None, info
            _, model = resident(client, info["pipeline"], name)
            check_estimate(info["pipeline"], info, model,
                           LOWEST_RATIO.get(info["pipeline"], 0.5))
            held += device_bytes(model)
        measured = sum(info["measured_bytes"] for info in described.values())
        assert grown >= 0.9 * measured, (
            f"the cache counts {measured / 2**20:.1f} MiB, torch holds {grown / 2**20:.1f} MiB")
        assert grown <= 1.1 * held + (8 << 20), (
            f"torch holds {grown / 2**20:.1f} MiB, the models' tensors {held / 2**20:.1f} MiB")
