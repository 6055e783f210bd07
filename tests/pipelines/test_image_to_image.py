"""image-to-image end to end in tiny mode through the multipart route."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines import _diffusion as diffusion
from runner.hub import writing_snapshot
from tests.conftest import decode_png_url, pixels, png_bytes, post_image, serving
from tests.support.contract import assert_valid
from tests.support.helpers import write_tiny_lora


@pytest.fixture(scope="module")
def i2i(tmp_path_factory):
    with serving("image-to-image", tmp_path_factory.getbasetemp() / "tiny-models-i2i") as c:
        yield c


def post(client, image=None, **fields):
    return post_image(client, "/image-to-image", png_bytes(64, 48) if image is None else image,
                      **{"prompt": "make it snowy", "num_inference_steps": "2", **fields})


def images(r):
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "ImageResponse")
    return r.json()["images"]


def test_pix2pix_default_with_go_style_fields(i2i):
    out = images(post(i2i, seed="7", guidance_scale="7.500000", image_guidance_scale="1.500000",
                      safety_check="true", num_images_per_prompt="2"))
    assert [i["seed"] for i in out] == [7, 8]
    assert all(decode_png_url(i["url"]).size == (64, 48) for i in out)
    again = images(post(i2i, seed="7", guidance_scale="7.500000",
                        image_guidance_scale="1.500000", num_images_per_prompt="2"))
    assert np.array_equal(pixels(out[0]), pixels(again[0]))


def test_the_input_image_steers_the_output(i2i):
    red = images(post(i2i, png_bytes(64, 64, (255, 0, 0)), seed="1"))
    blue = images(post(i2i, png_bytes(64, 64, (0, 0, 255)), seed="1"))
    assert not np.array_equal(pixels(red[0]), pixels(blue[0]))


def test_input_is_fitted_to_the_latent_grid(i2i):
    (out,) = images(post(i2i, png_bytes(70, 45)))
    assert decode_png_url(out["url"]).size == (64, 40)  # multiples of 8 for SD-family models
    (out,) = images(post(i2i, png_bytes(130, 70), model_id="SG161222/RealVisXL_V4.0_Lightning"))
    assert decode_png_url(out["url"]).size == (128, 64)  # multiples of 64 for SDXL


def test_exif_orientation_is_applied(i2i):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (64, 32), (10, 200, 10)).save(buf, format="JPEG", exif=exif)
    (out,) = images(post(i2i, buf.getvalue()))
    assert decode_png_url(out["url"]).size == (32, 64)


def test_large_inputs_are_scaled_into_the_models_pixel_cap(i2i):
    (out,) = images(post(i2i, png_bytes(1024, 1024), model_id="stabilityai/sd-turbo"))
    assert decode_png_url(out["url"]).size == (512, 512)  # sd-turbo caps at 512x512


@pytest.mark.parametrize("model_id", ["SG161222/RealVisXL_V4.0_Lightning",
                                      "ByteDance/SDXL-Lightning-4step",
                                      "stabilityai/sdxl-turbo", "stabilityai/sd-turbo"])
def test_other_models(i2i, model_id):
    (out,) = images(post(i2i, png_bytes(64, 64), model_id=model_id, seed="3",
                         num_inference_steps="4", strength="0.500000"))
    assert out["seed"] == 3


def test_strength_that_leaves_no_step_is_400(i2i):
    r = post(i2i, model_id="stabilityai/sd-turbo", strength="0.200000",
             num_inference_steps="2")
    assert r.status_code == 400
    assert "strength" in r.json()["detail"]["msg"]


def test_loras_are_shared_with_text_to_image(i2i):
    model_dir = i2i.app.state.service.model_dir
    with writing_snapshot(model_dir, "test/tiny-sd15-lora") as folder:
        write_tiny_lora(diffusion.tiny_pix2pix_pipeline(), folder)
    plain = images(post(i2i, seed="4"))
    styled = images(post(i2i, seed="4", loras=json.dumps({"test/tiny-sd15-lora": 1.0})))
    assert not np.array_equal(pixels(plain[0]), pixels(styled[0]))
    r = post(i2i, loras="[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]["msg"]


@pytest.mark.parametrize("fields, status", [
    ({"strength": "1.5"}, 422), ({"num_images_per_prompt": "9"}, 422),
    ({"model_id": "nobody/nothing"}, 422), ({"image_guidance_scale": "x"}, 422),
])
def test_bad_fields(i2i, fields, status):
    assert post(i2i, **fields).status_code == status


def test_missing_or_undecodable_image(i2i):
    r = i2i.post("/image-to-image", data={"prompt": "x"})
    assert r.status_code == 422
    r = post(i2i, b"\x89PNG\r\n\x1a\n\0\0\0\x01\0\x01\x02\x03 broken chunk")
    assert r.status_code == 400 and "could not be decoded" in r.json()["detail"]["msg"]
    r = post(i2i, b"\x89PNG\r\n\x1a\n broken")  # 7 bytes after the signature: cut short
    assert r.status_code == 400 and "truncated" in r.json()["detail"]["msg"]


def test_empty_upload_is_400(i2i):
    r = post(i2i, b"")
    assert r.status_code == 400 and "empty" in r.json()["detail"]["msg"]
