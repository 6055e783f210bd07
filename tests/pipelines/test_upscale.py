"""upscale end to end in tiny mode: the real StableDiffusionUpscalePipeline loaded from the
folder build_tiny writes, driven over HTTP with multipart bodies as go-livepeer sends them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import upscale
from runner.hub import ModelFiles
from runner.registry import ModelEntry
from runner.settings import Settings
from tests.conftest import decode_png_url, pixels, png_bytes, post_image, serving
from tests.support.contract import assert_valid
from tests.support.helpers import hook_replaced

FAST = {"num_inference_steps": "2"}


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A textured input, so that a wrong resize or crop would show in the output."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def post(client, image: bytes | None = None, path: str = "/upscale", **fields):
    return post_image(client, path, png_bytes(16, 16) if image is None else image,
                      **{"prompt": "a cat", **FAST, **fields})


def upscaled(client, image: bytes | None = None, **fields) -> dict:
    r = post(client, image, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "ImageResponse")
    (media,) = body["images"]
    return media


def size(media: dict) -> tuple[int, int]:
    return decode_png_url(media["url"]).size


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """The upscale app in tiny mode; its warm-up builds and loads the tiny checkpoint."""
    with serving("upscale", tmp_path_factory.getbasetemp() / "tiny-models-upscale") as client:
        yield client


@pytest.fixture(scope="module")
def capped(up, tmp_path_factory):
    """The same checkpoints behind a models.yaml whose upscale entry has tiny limits: inputs
    over 32x32 pixels are scaled down, outputs over 64x64 pixels decode in VAE tiles."""
    spec = yaml.safe_load(Settings().models_file.read_text())
    group = spec["pipelines"]["upscale"]
    for model in group["models"]:
        model["options"] = {"max_input_pixels": 32 * 32, "vae_tiling_above_pixels": 64 * 64}
    models_file = tmp_path_factory.mktemp("upscale-capped") / "models.yaml"
    models_file.write_text(yaml.safe_dump({"safety_checker": spec["safety_checker"],
                                           "pipelines": {"upscale": group}}))
    with serving("upscale", up.app.state.service.model_dir, models_file=models_file) as client:
        yield client


def test_output_is_four_times_the_input_and_matches_the_contract(up):
    media = upscaled(up)
    assert size(media) == (64, 64)
    assert media["nsfw"] is False
    assert 0 <= media["seed"] < 2**32  # a random seed is chosen and echoed
    # Not square, sides not multiples of 8: resized to 32x16 first.
    assert size(upscaled(up, noise_png(36, 20))) == (128, 64)
    assert size(upscaled(up, path="/upscale/")) == (64, 64)


def test_seeds_are_echoed_and_reproducible(up):
    zero = upscaled(up, noise_png(16, 16), seed="0")
    assert zero["seed"] == 0
    again = upscaled(up, noise_png(16, 16), seed="0")
    assert np.array_equal(pixels(zero), pixels(again))
    other = upscaled(up, noise_png(16, 16), seed="1")
    assert other["seed"] == 1
    assert not np.array_equal(pixels(zero), pixels(other))
    assert upscaled(up, seed=str(2**63 - 1))["seed"] == 2**63 - 1


def test_prompt_and_steps_change_the_output(up):
    base = pixels(upscaled(up, noise_png(16, 16), seed="3"))
    assert not np.array_equal(base, pixels(upscaled(up, noise_png(16, 16), seed="3",
                                                    prompt="the dog")))
    assert not np.array_equal(base, pixels(upscaled(up, noise_png(16, 16), seed="3",
                                                    num_inference_steps="3")))


def test_default_steps_come_from_models_yaml(up, monkeypatch):
    seen = []
    real = upscale.run

    def spy(model, request, ctx):
        seen.append(request.num_inference_steps)
        return real(model, request, ctx)

    default = up.app.state.service.registry.default("upscale").defaults["num_inference_steps"]
    with hook_replaced(up.app.state.service.specs["upscale"], "run", spy):
        upscaled(up, num_inference_steps=None)
        upscaled(up, num_inference_steps="3")
    assert seen == [default, 3]


def test_inputs_over_the_cap_are_scaled_down_not_rejected(capped):
    # 64x48 is 3072 pixels, over the 1024 cap: scaled by sqrt(1/3) to 36x27, cut to 32x24.
    assert size(upscaled(capped, noise_png(64, 48))) == (128, 96)
    assert size(upscaled(capped, noise_png(100, 100))) == (128, 128)
    assert size(upscaled(capped, noise_png(16, 16))) == (64, 64)  # under the cap: as is


def test_vae_tiling_only_for_outputs_over_the_threshold(capped, monkeypatch):
    seen = []
    real = upscale.set_vae_tiling

    def spy(vae, on):
        real(vae, on)
        seen.append((on, vae.use_tiling))

    monkeypatch.setattr(upscale, "set_vae_tiling", spy)
    small = upscaled(capped, noise_png(16, 16), seed="4")  # 64x64 out: at the threshold
    upscaled(capped, noise_png(32, 32), seed="4")  # 128x128 out: over it, decoded in tiles
    again = upscaled(capped, noise_png(16, 16), seed="4")  # and off again
    assert seen == [(False, False), (True, True), (False, False)]
    assert np.array_equal(pixels(small), pixels(again))


def test_tiling_decision_and_switch():
    entry = ModelEntry(id="a/b", kind="sd-x4-upscaler",
                       options={"vae_tiling_above_pixels": 1000})
    assert not upscale.needs_vae_tiling(25, 40, entry)
    assert upscale.needs_vae_tiling(25, 41, entry)
    default = ModelEntry(id="a/b", kind="sd-x4-upscaler")
    assert not upscale.needs_vae_tiling(1024, 1024, default)
    assert upscale.needs_vae_tiling(2048, 2048, default)
    assert upscale.input_cap(default) * 16 == 2048 * 2048

    vae = upscale.tiny_upscale_pipeline().vae
    upscale.set_vae_tiling(vae, True)
    assert vae.use_tiling
    upscale.set_vae_tiling(vae, False)
    assert not vae.use_tiling


def test_working_memory_counts_the_float32_vae_at_four_bytes_per_float():
    """load() keeps the x4 VAE in float32 even for a float16 entry, so its decode, the peak for
    untiled outputs, costs as much at either serving precision."""
    from pipelines import _working_memory as wm

    class Upload:
        file = io.BytesIO(noise_png(256, 256))

    entry = ModelEntry(id="a/b", kind="sd-x4-upscaler", dtype="float16")
    request = upscale.UpscaleParams.model_construct(image=Upload())
    files = ModelFiles(Path("/nonexistent"), entry.id)  # no configs: the reference widths
    half, full = (upscale.working_memory(entry, files, request, b) for b in (2, 4))
    assert half == full == 1024 * 1024 * wm.VAE_BYTES_PER_PIXEL * 2


def test_undecodable_image_is_400(up):
    r = post(up, b"not an image")
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["detail"]["msg"], str)
    assert_valid(r.json(), "HTTPError")


@pytest.mark.parametrize("fields", [
    {"prompt": None},
    {"num_inference_steps": "0"},
    {"num_inference_steps": "151"},
    {"seed": "-1"},
    {"safety_check": "maybe"},
    {"model_id": "nobody/nothing"},
])
def test_bad_fields_are_422(up, fields):
    r = post(up, **fields)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)
    assert_valid(r.json(), "HTTPValidationError")


def test_missing_image_is_422(up):
    r = up.post("/upscale", data={"prompt": "a cat", **FAST})
    assert r.status_code == 422, r.text
    assert any(item["loc"][-1] == "image" for item in r.json()["detail"])


def test_flagged_outputs_are_blacked_out(flagging_dir):
    with serving("upscale", flagging_dir) as client:
        checked = upscaled(client, noise_png(16, 16), seed="5")
        unchecked = upscaled(client, noise_png(16, 16), seed="5", safety_check="false")
    assert checked["nsfw"] is True and pixels(checked).max() == 0
    assert unchecked["nsfw"] is False and pixels(unchecked).max() > 0
    assert size(checked) == size(unchecked) == (64, 64)


def test_server_timing_names_each_stage(up):
    r = post(up, safety_check="true")
    assert r.status_code == 200, r.text
    stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert {"model", "denoise", "safety", "encode"} <= set(stages)
