"""End to end in CPU tiny mode: two real pipelines in one process under a byte budget too small
for all their models, so serving them means demoting to the host tier and evicting."""

from __future__ import annotations

import pytest

from tests.conftest import png_bytes, serving

PIPELINES = "text-to-image,image-to-text"
EXTRAS = [("text-to-image", "stabilityai/sd-turbo"), ("text-to-image", "stabilityai/sdxl-turbo"),
          ("image-to-text", "Salesforce/blip-image-captioning-base")]
PNG = png_bytes(48, 48)
SIDE = 512  # the default-sized request's: the room the warm plan leaves is one such run


def call(client, pipeline: str, model_id: str):
    if pipeline == "text-to-image":
        return client.post("/text-to-image", json={
            "prompt": "a cat", "model_id": model_id, "width": SIDE, "height": SIDE,
            "num_inference_steps": 1, "safety_check": False})
    return client.post("/image-to-text", files={"image": ("a.png", PNG, "image/png")},
                       data={"model_id": model_id})


def working_memory(pipeline: str, tiny_dir) -> int:
    """What the service reserves for `call`'s requests on the default models in tiny mode
    (4-byte floats, the tiny architectures' widths)."""
    from pipelines import image_to_text, text_to_image
    from runner.hub import ModelFiles
    from runner.registry import Registry
    from runner.settings import Settings

    entry = Registry.load(Settings().models_file).default(pipeline)
    files = ModelFiles(tiny_dir, entry.id)
    if pipeline == "image-to-text":
        return image_to_text.working_memory(entry, files, None, 4)
    request = text_to_image.TextToImageParams(prompt="a cat", width=SIDE, height=SIDE,
                                              guidance_scale=0.0)
    return text_to_image.working_memory(entry, files, request, 4)


@pytest.fixture(scope="module")
def sizes(tiny_dir) -> dict[str, int]:
    """Measured bytes of every model involved, read once under an unlimited budget."""
    with serving(PIPELINES, tiny_dir) as client:
        for pipeline, model_id in EXTRAS:
            r = client.post(f"/models/{model_id}/load", params={"pipeline": pipeline})
            assert r.status_code == 200, r.text
        listing = client.get("/models").json()["models"]
    return {m["id"]: m["measured_bytes"] for m in listing}


def test_several_pipelines_share_a_budget_that_forces_demotions_and_evictions(tiny_dir, sizes):
    pinned = {m for m, _ in sizes.items() if m not in {e for _, e in EXTRAS}}
    largest = max(sizes[e] for _, e in EXTRAS)
    # Room beside the warm models for one run's working memory and about one and a half extra
    # models: never two extras while a request runs.
    room = max(working_memory(pipeline, tiny_dir)
               for pipeline in ("text-to-image", "image-to-text"))
    budget = sum(sizes[m] for m in pinned) + room + largest * 3 // 2
    with serving(PIPELINES, tiny_dir, vram_budget=budget, host_budget=largest) as client:
        for _ in range(2):
            for pipeline, model_id in EXTRAS:
                r = call(client, pipeline, model_id)
                assert r.status_code == 200, r.text
                state = client.get("/models").json()
                assert state["resident_bytes"] + state["running_bytes"] <= state["budget_bytes"]
                assert state["host_bytes"] <= state["host_budget_bytes"]
        state = client.get("/models").json()
        by_id = {m["id"]: m for m in state["models"]}
        # The warm defaults never left the device; the extras took turns.
        assert all(by_id[m]["tier"] == "device" and by_id[m]["pinned"] for m in pinned)
        demoted = sum(m["demotions"] for m in state["models"])
        assert demoted >= 2
        metrics = client.get("/metrics/").text
        assert "runner_model_demotions_total" in metrics
        assert 'runner_model_loads_total{model="stabilityai/sd-turbo",outcome="ok",' \
               'source="host"}' in metrics
        # And the default models still answer at once.
        assert call(client, "text-to-image", "").status_code == 200
        assert call(client, "image-to-text", "").status_code == 200


def test_a_request_too_large_for_the_device_is_422_with_the_size_that_fits(tiny_dir, sizes):
    """A budget with room for one default-sized (512x512) run beside the warm models."""
    warm = sizes["SG161222/RealVisXL_V4.0_Lightning"] + \
        sizes["CompVis/stable-diffusion-safety-checker"]
    room = working_memory("text-to-image", tiny_dir) + (1 << 20)
    with serving("text-to-image", tiny_dir, vram_budget=warm + room) as client:
        r = client.post("/text-to-image", json={"prompt": "a cat", "width": 1024,
                                                "height": 1024, "num_inference_steps": 1})
        assert r.status_code == 422, r.text
        msg = r.json()["detail"][0]["msg"]
        assert "working memory" in msg and "The largest that fits is about" in msg
        side = int(msg.split("about ")[-1].split("x")[0])
        assert 64 <= side < 1024
        # The size it names is served.
        r = client.post("/text-to-image", json={"prompt": "a cat", "width": side,
                                                "height": side, "num_inference_steps": 1})
        assert r.status_code == 200, r.text
