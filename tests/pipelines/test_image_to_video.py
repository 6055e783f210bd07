"""image-to-video end to end in tiny mode: a random-weight SVD loaded from its folder, fields
sent as go-livepeer's multipart writer sends them."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipelines import image_to_video
from runner.context import RunContext
from runner.device import Device
from runner.hub import ModelFiles
from runner.registry import ModelEntry, Registry
from tests.conftest import decode_png_url, pixels, png_bytes, post_image, serving
from tests.support.contract import assert_valid

FRAMES = 25  # models.yaml: options.num_frames of both SVD xt models
# Go's multipart writer: every value a string, floats with six decimals, booleans lowercase.
SMALL = {"width": "64", "height": "64", "num_inference_steps": "2"}
SAFETY_CHECKER = ModelEntry(id="CompVis/stable-diffusion-safety-checker",
                            kind="clip-safety-checker")


def post(client, image: bytes | None = None, path: str = "/image-to-video", **fields):
    return post_image(client, path, png_bytes(80, 48) if image is None else image,
                      **{**SMALL, **fields})


def generate(client, **fields) -> list[dict]:
    r = post(client, **fields)
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "VideoResponse")
    (batch,) = r.json()["frames"]  # exactly one batch
    return batch


@pytest.fixture(scope="module")
def i2v(tmp_path_factory) -> Iterator[TestClient]:
    with serving("image-to-video", tmp_path_factory.getbasetemp() / "tiny-models-i2v") as c:
        yield c


@pytest.fixture(scope="module")
def seed_zero(i2v) -> list[dict]:
    """One Go-style request with every field set, seed 0 (a valid seed, not 'absent')."""
    return generate(i2v, width=96, height=64, fps=6, motion_bucket_id=127,
                    noise_aug_strength="0.020000", safety_check="true", seed=0,
                    model_id="")


def test_frames_come_back_as_one_batch_of_pngs(seed_zero):
    assert len(seed_zero) == FRAMES
    for frame in seed_zero:
        assert frame["seed"] == 0 and frame["nsfw"] is False
        image = decode_png_url(frame["url"])
        assert image.format == "PNG" and image.size == (96, 64)


def test_same_seed_same_video(i2v, seed_zero):
    again = generate(i2v, width=96, height=64, seed=0)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(seed_zero, again,
                                                                      strict=True))


def test_a_random_seed_when_none_is_sent(i2v):
    frames = generate(i2v)
    seeds = {f["seed"] for f in frames}
    assert len(seeds) == 1 and 0 <= seeds.pop() < 2**32
    assert len(frames) == FRAMES


def test_mp4_output_is_one_h264_video(i2v):
    (video,) = generate(i2v, output_format="mp4", fps=8, seed=7)
    assert video["seed"] == 7 and video["nsfw"] is False
    assert video["url"].startswith("data:video/mp4;base64,")
    data = base64.b64decode(video["url"].split(",", 1)[1])
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        decoded = list(container.decode(stream))
    assert len(decoded) == FRAMES
    assert {(f.width, f.height) for f in decoded} == {(64, 64)}


def test_other_listed_model_loads_on_demand(i2v):
    model_id = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
    frames = generate(i2v, model_id=model_id, seed=1)
    assert len(frames) == FRAMES
    states = {m["id"]: m["state"] for m in i2v.get("/models").json()["models"]}
    assert states[model_id] == "ready"


def test_server_timing_names_each_stage(i2v):
    r = post(i2v, num_inference_steps=1)
    stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert {"model", "denoise", "safety", "encode"} <= set(stages)


@pytest.mark.parametrize("fields, name", [({"width": 100}, "width"),
                                          ({"height": 68}, "height")])
def test_sizes_not_a_multiple_of_8_are_400(i2v, fields, name):
    r = post(i2v, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["msg"] == (f"{name} must be a multiple of 8, "
                                         f"got {fields[name]}")


@pytest.mark.parametrize("fields", [
    {"width": 2048}, {"height": 32}, {"fps": 0}, {"fps": 61}, {"motion_bucket_id": 1024},
    {"noise_aug_strength": "lots"}, {"noise_aug_strength": "10.500000"}, {"seed": -1},
    {"num_inference_steps": 0}, {"safety_check": "maybe"}, {"output_format": "gif"},
    {"model_id": "nobody/nothing"},
])
def test_bad_fields_are_422_in_fastapis_shape(i2v, fields):
    r = post(i2v, **fields)
    assert r.status_code == 422, r.text
    assert_valid(r.json(), "HTTPValidationError")
    assert r.json()["detail"][0]["loc"][-1] == next(iter(fields))


def test_missing_image_is_422(i2v):
    r = i2v.post("/image-to-video", data=SMALL)
    assert r.status_code == 422, r.text
    assert any(item["loc"][-1] == "image" for item in r.json()["detail"])


@pytest.mark.parametrize("data", [b"", b"not an image at all"])
def test_undecodable_image_is_400(i2v, data):
    r = post(i2v, data)
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "HTTPError")
    assert "image" in r.json()["detail"]["msg"]


def test_trailing_slash_route(i2v):
    r = post(i2v, path="/image-to-video/", num_inference_steps="1")
    assert r.status_code == 200, r.text


# -- safety --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["black", "blur"])
def test_a_flagged_input_flags_every_frame(flagging_dir, policy):
    with serving("image-to-video", flagging_dir, safety_policy=policy) as client:
        checked = generate(client, seed=5)
        unchecked = generate(client, seed=5, safety_check="false") if policy == "blur" else []
    assert len(checked) == FRAMES and all(f["nsfw"] for f in checked)
    if policy == "black":  # nothing worth generating: the video would be black anyway
        assert all(pixels(f).max() == 0 for f in checked)
        assert {decode_png_url(f["url"]).size for f in checked} == {(64, 64)}
    else:
        assert not any(f["nsfw"] for f in unchecked)
        for blurred, original in zip(checked, unchecked, strict=True):
            assert pixels(blurred).max() > 0
            assert not np.array_equal(pixels(blurred), pixels(original))


def test_a_flagged_output_frame_flags_every_frame(i2v):
    """The input passes, one sampled output frame does not: the policy covers all frames."""
    service = i2v.app.state.service
    entry = Registry.load(service.settings.models_file).default("image-to-video")
    model = image_to_video.load(entry, ModelFiles(service.model_dir), Device("cpu"))
    calls = []

    def checker(images):
        calls.append(len(images))
        return [len(calls) == 2 and i == 1 for i in range(len(images))]

    request = image_to_video.ImageToVideoParams.model_construct(
        image=FakeUpload(png_bytes(64, 64)), width=64, height=64, fps=6, motion_bucket_id=127,
        noise_aug_strength=0.02, num_inference_steps=1, seed=3, safety_check=True,
        output_format=None)
    ctx = RunContext(entry, Device("cpu"), ModelFiles(service.model_dir), service.settings,
                     checker=checker)
    (batch,) = image_to_video.run(model, request, ctx).frames
    assert calls == [1, 4]  # the input, then one batch of sampled output frames
    assert len(batch) == FRAMES and all(f.nsfw for f in batch)
    assert all(pixels(f.model_dump()).max() == 0 for f in batch)


class FakeUpload:
    """What run() reads from an UploadFile."""

    def __init__(self, data: bytes):
        self.file = io.BytesIO(data)


def test_output_frames_sampled_evenly():
    assert image_to_video.sample(25) == [0, 8, 16, 24]
    assert image_to_video.sample(14) == [0, 4, 9, 13]
    assert image_to_video.sample(3) == [0, 1, 2]
    assert image_to_video.sample(1) == [0]
