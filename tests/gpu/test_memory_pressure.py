"""The model cache and the executor under GPU memory pressure, on the real device. The two
extra text-to-image models are SD-layout checkpoints with a wide UNet (about 120 MiB in
float16), written into the tiny folder before the runner would write its own: large enough that
the device's other allocations (CUDA context, library handles), which the cache counts as
`foreign_bytes`, cannot blur the sizes the tests set VRAM_BUDGET from.

- a model that cannot fit VRAM_BUDGET is refused with a 422 naming the sizes, and the warm
  model keeps serving;
- an idle model is moved off the device (demoted to CPU RAM, or dropped) to make room for
  another, and its memory really leaves the GPU;
- a CUDA out-of-memory error inside a run (a real one: an allocation larger than the GPU)
  moves idle models off the device and retries the run once; a second one is a 500, and the
  runner serves the next request.
"""

from __future__ import annotations

import types
from collections import Counter
from pathlib import Path

import pytest

from pipelines import _diffusion as diffusion
from pipelines import text_to_image
from runner.hub import writing_snapshot
from tests.gpu.support import cuda_app, models, release_cuda, small_request

pytestmark = pytest.mark.gpu
T2I = "text-to-image"
SD_TURBO = "stabilityai/sd-turbo"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def write_wide_sd(model_dir: Path, repo: str, width: int = 256) -> None:
    """The tiny SD pipeline with a UNet `width` channels wide, in the layout tiny mode writes
    for `sd` entries."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    small = diffusion.tiny_sd_pipeline()
    unet = UNet2DConditionModel.from_config(small.unet.config,
                                            block_out_channels=(width, 2 * width))
    pipe = StableDiffusionPipeline(**{**small.components, "unet": unet},
                                   requires_safety_checker=False)
    with writing_snapshot(model_dir, repo) as folder:
        diffusion.save_pipeline(pipe, folder)


@pytest.fixture(scope="module")
def sizes(tmp_path_factory) -> dict:
    """The tiny folder; the CUDA bytes of the pinned (warm) models and of the two wide models
    as the cache estimates them; and the device bytes it counts as others' after running."""
    tiny_dir = tmp_path_factory.mktemp("tiny-models-pressure")
    for repo in (SD_TURBO, SD15):
        write_wide_sd(tiny_dir, repo)
    with cuda_app(T2I, tiny=True, tiny_dir=tiny_dir) as client:
        for model_id in (SD_TURBO, SD15):
            assert small_request(client, T2I, model_id=model_id).status_code == 200
        described = models(client)
        foreign = client.get("/models").json().get("foreign_bytes", 0)
    return {"tiny_dir": tiny_dir, "foreign": foreign,
            "pinned": sum(m["estimated_bytes"] for m in described.values() if m["pinned"]),
            SD_TURBO: described[SD_TURBO]["estimated_bytes"],
            SD15: described[SD15]["estimated_bytes"]}


def budget(sizes: dict, room: int) -> int:
    """VRAM_BUDGET leaving `room` bytes beside the pinned models (the cache subtracts what
    others hold on the device from VRAM_BUDGET)."""
    return sizes["foreign"] + sizes["pinned"] + room


def off_device(described: dict, model_id: str) -> bool:
    return model_id not in described or described[model_id]["tier"] != "device"


def test_a_model_larger_than_the_budget_is_refused_and_the_warm_model_stays(sizes):
    room = sizes[SD_TURBO] // 2
    with cuda_app(T2I, tiny=True, tiny_dir=sizes["tiny_dir"],
                  vram_budget=budget(sizes, room)) as client:
        r = small_request(client, T2I, model_id=SD_TURBO)
        assert r.status_code == 422, r.text
        assert "needs about" in r.json()["detail"][0]["msg"]
        assert off_device(models(client), SD_TURBO)
        assert small_request(client, T2I).status_code == 200


def test_an_idle_model_is_moved_off_the_device_to_make_room(sizes):
    import torch

    room = max(sizes[SD_TURBO], sizes[SD15]) * 3 // 2
    with cuda_app(T2I, tiny=True, tiny_dir=sizes["tiny_dir"],
                  vram_budget=budget(sizes, room)) as client:
        assert small_request(client, T2I, model_id=SD_TURBO).status_code == 200
        release_cuda()
        with_turbo = torch.cuda.memory_allocated()
        assert small_request(client, T2I, model_id=SD15).status_code == 200
        release_cuda()
        described = models(client)
        assert off_device(described, SD_TURBO), described[SD_TURBO]
        assert described[SD15]["state"] == "ready"
        grown = torch.cuda.memory_allocated() - with_turbo
        assert grown <= sizes[SD15] // 2, (
            f"memory grew by {grown / 2**20:.1f} MiB: the moved model is still on the GPU")


def exhaust_gpu() -> None:
    """A real CUDA out-of-memory error: ask the allocator for twice the GPU."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.empty(2 * total, dtype=torch.uint8, device="cuda")


def flaky_text_to_image() -> tuple[dict, Counter]:
    """text-to-image whose run runs out of GPU memory on the first attempt at prompt
    "oom-once" and on every attempt at "oom-always"; attempts are counted per request."""
    attempts: Counter = Counter()

    def run(model, request, ctx):
        attempts[id(request)] += 1
        if request.prompt == "oom-always" or (
                request.prompt == "oom-once" and attempts[id(request)] == 1):
            exhaust_gpu()
        return text_to_image.run(model, request, ctx)

    module = types.ModuleType(text_to_image.__name__, text_to_image.__doc__)
    module.__dict__.update({k: v for k, v in vars(text_to_image).items()
                            if not k.startswith("__")})
    module.run = run
    return {T2I: module}, attempts


def test_an_oom_in_a_run_moves_idle_models_off_and_retries_once(sizes):
    modules, attempts = flaky_text_to_image()
    with cuda_app(T2I, modules, tiny=True, tiny_dir=sizes["tiny_dir"]) as client:
        assert client.post(f"/models/{SD_TURBO}/load").status_code == 200  # idle, unpinned
        r = small_request(client, T2I, prompt="oom-once")
        assert r.status_code == 200, r.text
        assert list(attempts.values()) == [2]
        described = models(client)
        assert off_device(described, SD_TURBO), "the idle model stayed on the GPU after the OOM"
        assert all(m["state"] == "ready" for m in described.values() if m["pinned"])


def test_a_second_oom_is_a_500_and_the_runner_keeps_serving(sizes):
    modules, attempts = flaky_text_to_image()
    with cuda_app(T2I, modules, tiny=True, tiny_dir=sizes["tiny_dir"]) as client:
        r = small_request(client, T2I, prompt="oom-always")
        assert r.status_code == 500, r.text
        assert "out of memory" in r.json()["detail"]["msg"]
        assert list(attempts.values()) == [2]
        assert small_request(client, T2I).status_code == 200
        assert client.get("/health").json()["status"] == "IDLE"
