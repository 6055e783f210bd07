"""Hostile uploads and oversized fields: decompression bombs, broken and exotic images, EXIF
rotation, audio that is empty, broken or far longer than its file size suggests, SAM2 prompts
that do not fit, megabyte prompts, and counts and sizes past the caps. Each is a 4xx with a
message that says what is wrong (or, where the input is merely unusual, a 200), never a 5xx,
and the bombs never cost more than a bounded amount of memory."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.hardening import support
from tests.hardening.conftest import AUDIO_MAX_SECONDS
from tests.hardening.support import rejected

MIB = 1 << 20
IMAGE_ROUTES = {  # route -> the cheapest valid fields besides the image
    "/echo-image": {},
    "/image-to-image": {"prompt": "x", "num_inference_steps": "1"},
    "/upscale": {"prompt": "x", "num_inference_steps": "1"},
    "/image-to-video": {"width": "64", "height": "64", "num_inference_steps": "1"},
    "/image-to-text": {},
    "/segment-anything-2": {"point_coords": "[[1,1]]", "point_labels": "[1]"},
}


def post_image(client, route: str, image: bytes, name: str = "in.png", **fields):
    data = {**IMAGE_ROUTES[route], **{k: str(v) for k, v in fields.items()}}
    return client.post(route, data=data, files={"image": (name, image, "image/png")})


def post_audio(client, audio: bytes, name: str = "a.wav", ctype: str = "audio/wav", **fields):
    return client.post("/audio-to-text", data=fields, files={"audio": (name, audio, ctype)})


def peak_growth(send) -> tuple[object, int]:
    """The answer of `send()` and how far the process's peak RSS rose above its RSS before
    (the TestClient serves in this process)."""
    if not support.reset_peak_rss():
        pytest.skip("cannot reset the peak RSS counter here (/proc/self/clear_refs)")
    before = support.rss()
    response = send()
    return response, support.peak_rss() - before


# -- decompression bombs -----------------------------------------------------------------------

@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_decompression_bomb_is_refused_before_decoding(runner, route):
    bomb = support.bomb_png()  # 30000x30000, ~100 KB; 2.7 GB as RGB
    assert len(bomb) < 200_000
    r, grown = peak_growth(lambda: post_image(runner, route, bomb))
    rejected(r, 400, "limit", "900000000 pixels")
    assert grown < 64 * MIB, f"{route}: peak RSS rose {grown / MIB:.0f} MiB for a bomb"


def test_image_just_over_the_pixel_cap_is_refused_and_just_under_is_served(runner):
    cap = runner.app.state.service.settings.max_image_pixels
    side = int(cap**0.5)
    over = support.raw_png(side + 1, side)
    r, grown = peak_growth(lambda: post_image(runner, "/echo-image", over))
    rejected(r, 400, "limit", str(cap))
    assert grown < 32 * MIB
    r, grown = peak_growth(lambda: post_image(runner, "/echo-image", support.raw_png(side, side)))
    assert r.status_code == 200 and r.json()["width"] == side, r.text[:300]
    # The decoded RGB image is 3 bytes a pixel; nothing should hold many copies of it.
    assert grown < 3 * cap + 128 * MIB, f"{grown / MIB:.0f} MiB for a {side}x{side} image"


def test_huge_image_to_video_input_is_shrunk_before_the_pipeline_sees_it(runner):
    """A 4096x4096 all-black PNG is 2 KB; the pipeline's float32 resize of it took 1.6 GB."""
    image = support.raw_png(4096, 4096)
    r, grown = peak_growth(lambda: post_image(runner, "/image-to-video", image))
    assert r.status_code == 200, r.text[:300]
    assert grown < 512 * MIB, f"peak RSS rose {grown / MIB:.0f} MiB"


def test_text_chunk_bomb_is_refused(runner):
    r, grown = peak_growth(lambda: post_image(runner, "/echo-image", support.text_bomb_png()))
    rejected(r, 400, "could not be decoded")
    assert grown < 32 * MIB


@pytest.mark.parametrize("image, words", [
    (support.raw_png(0, 10), ["could not be decoded"]),
    (support.raw_png(10, 0), ["could not be decoded"]),
    (support.raw_png(2**31 - 1, 1, idat=b"x"), ["limit", "2147483647"]),
    (support.raw_png(100_000, 100_000, idat=b"x"), ["limit", "10000000000"]),
    (support.raw_png(64, 64, idat=b"\x78\x9c\x00"), ["truncated"]),  # the zlib stream stops
    (support.noise_png()[:60], ["truncated"]),
    (support.noise_png()[:-40], ["truncated"]),
    (b"\x89PNG\r\n\x1a\n", ["truncated", "IEND"]),
    (b"", ["empty"]),
    (b"\0" * 4096, ["could not be decoded", "format"]),
    (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
     ["could not be decoded"]),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", ["could not be decoded"]),
    (b"GIF89a\x10\x00\x10\x00\x00\x00\x00", ["truncated"]),
    (support.wav(support.tone(0.1)), ["could not be decoded", "format"]),
], ids=["zero-width", "zero-height", "2^31-wide", "1e10-pixels-lying", "corrupt-zlib",
        "truncated-header", "truncated-data", "magic-only", "empty", "zeros", "random",
        "eps-postscript", "gif-without-frames", "audio-as-image"])
def test_broken_images_are_400_with_a_clear_message(runner, image, words):
    msg = rejected(post_image(runner, "/echo-image", image), 400, *words)
    assert "BytesIO" not in msg and "object at" not in msg, msg


@pytest.mark.parametrize("route", ["/image-to-image", "/image-to-text", "/segment-anything-2",
                                   "/image-to-video", "/upscale"])
def test_broken_image_on_every_real_pipeline(runner, route):
    rejected(post_image(runner, route, support.noise_png()[:100]), 400, "truncated")
    rejected(post_image(runner, route, b"\0" * 100), 400, "could not be decoded")


# -- unusual but valid images --------------------------------------------------------------------

def _mode_image(mode: str, fmt: str) -> bytes:
    size = (20, 12)
    if mode == "I;16":
        image = Image.new("I;16", size, 40000)
    elif mode == "F":
        image = Image.fromarray(np.linspace(0, 1, 240, dtype=np.float32).reshape(12, 20), "F")
    elif mode == "P":
        image = Image.new("RGB", size, (200, 10, 10)).convert("P")
        image.info["transparency"] = 0
    else:
        image = Image.new(mode, size)
    return support.image_bytes(image, fmt)


@pytest.mark.parametrize("mode, fmt", [
    ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
    ("RGBA", "PNG"), ("RGBA", "WEBP"), ("LA", "PNG"), ("P", "PNG"), ("P", "GIF"), ("1", "PNG"),
    ("1", "BMP"), ("L", "JPEG"), ("YCbCr", "JPEG"), ("RGB", "TIFF"),
])
def test_any_pixel_mode_is_served_as_rgb(runner, mode, fmt):
    r = post_image(runner, "/echo-image", _mode_image(mode, fmt))
    assert r.status_code == 200, r.text[:300]
    assert (r.json()["width"], r.json()["height"]) == (20, 12)


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG")])
def test_exotic_modes_through_a_real_pipeline(runner, mode, fmt):
    r = post_image(runner, "/image-to-text", _mode_image(mode, fmt))
    assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text[:300]


def test_exif_orientation_is_applied(runner):
    """A 40x20 JPEG whose EXIF says "rotate 90 clockwise" is a 20x40 image: the echo sees the
    rotated size, and SAM2's masks (returned at the input size) are 40 rows of 20."""
    jpeg = support.exif_rotated_jpeg(40, 20, orientation=6)
    r = post_image(runner, "/echo-image", jpeg, name="photo.jpg")
    assert (r.json()["width"], r.json()["height"]) == (20, 40), r.text
    r = post_image(runner, "/segment-anything-2", jpeg, name="photo.jpg",
                   point_coords="[[10,30]]", point_labels="[1]")
    assert r.status_code == 200, r.text[:300]
    masks = np.array(json.loads(r.json()["masks"]))
    assert masks.shape[1:] == (40, 20), masks.shape


def test_exif_rotation_moves_the_pixels_not_just_the_size():
    from runner.media import decode_image

    image = decode_image(support.exif_rotated_jpeg(40, 20, orientation=6), 1 << 20)
    pixels = np.asarray(image, dtype=int)
    # Left half red before rotation: after 90 degrees clockwise it is the top half.
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 60, pixels[2, 10]
    assert pixels[37, 10, 2] > 200 and pixels[37, 10, 0] < 60, pixels[37, 10]


@pytest.mark.parametrize("orientation", [0, 9, 255, 65535])
def test_nonsense_exif_orientation_is_ignored(runner, orientation):
    r = post_image(runner, "/echo-image", support.exif_rotated_jpeg(40, 20, orientation))
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (40, 20)


def test_corrupt_exif_block_is_ignored(runner):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16)).save(buf, "JPEG", exif=b"Exif\0\0II*\0\xff\xff\xff\x7f")
    r = post_image(runner, "/echo-image", buf.getvalue())
    assert r.status_code == 200 and r.json()["width"] == 24, r.text


@pytest.mark.parametrize("size", [(1, 1), (1, 64), (64, 1), (2, 2)])
def test_one_pixel_images_never_crash_a_pipeline(runner, size):
    image = support.noise_png(*size)
    for route in IMAGE_ROUTES:
        r = post_image(runner, route, image)
        status = support.check_answer(r, (route, size))
        assert status in (200, 400), (route, size, r.text[:300])
        if status == 400:
            rejected(r, 400, "pixel")


# -- audio ----------------------------------------------------------------------------------------

def test_empty_audio_is_415(runner):
    rejected(post_audio(runner, b""), 415, "empty")


@pytest.mark.parametrize("audio", [
    bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8)),
    support.wav(support.tone(1))[:30], b"RIFF\xff\xff\xff\xffWAVE", b"ID3\x04\0\0\0\0\0\0",
    b"fLaC" + b"\0" * 64, b"OggS" + b"\xff" * 64, b"hello, this is text",
    support.wav(np.zeros(10), rate=0),
], ids=["random", "truncated-header", "riff-only", "id3-only", "flac-magic", "ogg-magic", "text",
        "zero-rate"])
def test_garbage_audio_is_415(runner, audio):
    rejected(post_audio(runner, audio), 415, "audio")


def test_audio_with_a_header_and_no_samples_is_415(runner):
    rejected(post_audio(runner, support.wav(np.zeros(0))), 415, "no samples")


def test_an_image_sent_as_audio_is_415(runner):
    rejected(post_audio(runner, support.noise_png(), name="a.wav"), 415, "audio")


def test_wav_header_claiming_hours_holds_a_fraction_of_a_second(runner):
    """A header that promises 37 h over 0.3 s of samples: refused as cut short, from the
    header, with nothing decoded."""
    lying = support.wav(support.tone(0.3), claimed_bytes=0xFFFFFFF0)  # 37 h at 16 kHz
    r, grown = peak_growth(lambda: post_audio(runner, lying))
    rejected(r, 400, "ends before its declared length")
    assert grown < 128 * MIB


def test_a_wav_written_while_streaming_declares_no_length_and_is_served(runner):
    """0 or 0xFFFFFFFF in the data size: the writer did not know the length yet."""
    for claimed in (0, 0xFFFFFFFF):
        streamed = support.wav(support.tone(0.5), claimed_bytes=claimed)
        r = post_audio(runner, streamed)
        assert r.status_code == 200, (claimed, r.text[:300])


# -- uploads cut short -----------------------------------------------------------------------------
# A client whose upload was cut off gets a 400 that says so, for every accepted format and
# every upload route; nothing half-decoded reaches a model.

def image_formats() -> dict[str, bytes]:
    noise = Image.open(io.BytesIO(support.noise_png(48, 32)))
    return {fmt: support.image_bytes(noise, fmt) for fmt in ("PNG", "JPEG", "WEBP")}


IMAGES = image_formats()


@pytest.mark.parametrize("fmt", list(IMAGES))
@pytest.mark.parametrize("cut", ["200 bytes", "half", "all but the last byte"])
@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_a_cut_off_image_is_400_on_every_route(runner, route, fmt, cut):
    whole = IMAGES[fmt]
    size = {"200 bytes": 200, "half": len(whole) // 2, "all but the last byte": len(whole) - 1}
    r = post_image(runner, route, whole[:size[cut]])
    support.check_answer(r, (route, fmt, cut))
    rejected(r, 400, "truncated")


def audio_formats() -> dict[str, bytes]:
    """Two seconds of tone as the containers the route takes (wav, mp3, flac, m4a, webm, ogg)."""
    import av
    import soundfile

    samples = support.tone(2.0).astype(np.float32)
    out = {"wav": support.wav(samples)}
    for fmt, subtype in (("mp3", "MPEG_LAYER_III"), ("flac", "PCM_16"), ("ogg", "VORBIS")):
        buf = io.BytesIO()
        soundfile.write(buf, samples, 16_000, format=fmt.upper(), subtype=subtype)
        out[fmt] = buf.getvalue()
    for fmt, container, codec, rate in (("m4a", "mp4", "aac", 16_000),
                                        ("webm", "webm", "libopus", 48_000)):
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as muxer:
            stream = muxer.add_stream(codec, rate=rate, layout="mono")
            tone = support.tone(2.0, rate).astype(np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                muxer.mux(packet)
        out[fmt] = buf.getvalue()
    return out


AUDIO = audio_formats()


@pytest.mark.parametrize("fmt", list(AUDIO))
@pytest.mark.parametrize("cut", ["300 bytes", "half"])
def test_cut_off_audio_is_400(runner, fmt, cut):
    whole = AUDIO[fmt]
    assert post_audio(runner, whole, name=f"a.{fmt}").status_code == 200
    part = whole[:300] if cut == "300 bytes" else whole[: len(whole) // 2]
    r = post_audio(runner, part, name=f"a.{fmt}")
    support.check_answer(r, (fmt, cut))
    rejected(r, 400, "ends before its declared length")


def test_hours_of_compressed_silence_are_refused_while_decoding(runner):
    """An hour of FLAC silence is ~650 KB; decoded at 16 kHz it is 230 MB. The limit is
    checked while decoding, so it is refused after AUDIO_MAX_SECONDS of samples."""
    flac = support.flac_silence(3600)
    assert len(flac) < 2 * MIB
    r, grown = peak_growth(lambda: post_audio(runner, flac, name="a.flac", ctype="audio/flac"))
    rejected(r, 400, "longer than the limit", str(AUDIO_MAX_SECONDS))
    assert grown < 48 * MIB, f"peak RSS rose {grown / MIB:.0f} MiB"


@pytest.mark.parametrize("name, ctype", [("speech.mp3", "audio/mpeg"), ("speech.png", "image/png"),
                                         ("speech", ""), ("../../etc/passwd", "audio/wav")])
def test_the_extension_and_content_type_do_not_matter(runner, name, ctype):
    r = post_audio(runner, support.wav(support.tone(0.3)), name=name,
                   ctype=ctype or "application/octet-stream")
    assert r.status_code == 200, r.text[:300]


def test_a_video_without_audio_is_415(runner):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    rejected(post_audio(runner, buf.getvalue(), name="a.mp4", ctype="video/mp4"), 415,
             "no audio stream")


@pytest.mark.parametrize("metadata", ["[" * 100_000, "1" * 5000, '{"a": ' + "9" * 5000 + "}",
                                      "{", "not json"])
def test_audio_metadata_that_is_not_json_is_400(runner, metadata):
    rejected(post_audio(runner, support.wav(support.tone(0.2)), metadata=metadata), 400,
             "metadata")


@pytest.mark.parametrize("mode", ["maybe", "words", "2", "yes"])
def test_unknown_timestamp_mode_is_422(runner, mode):
    r = post_audio(runner, support.wav(support.tone(0.2)), return_timestamps=mode)
    rejected(r, 422, "return_timestamps")


# -- SAM2 prompts ---------------------------------------------------------------------------------

SAM_IMAGE = support.noise_png(48, 32)


@pytest.mark.parametrize("fields, field", [
    ({"point_coords": "[[48.5,10]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[-1,10]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[10,1e9]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[0.5,1.5]]", "point_labels": "[1]", "normalize_coords": "false"},
     "point_coords"),
    ({"box": "[0,0,49,10]"}, "box"),
    ({"box": "[-5,-5,10,10]"}, "box"),
    ({"box": "[20,20,10,10]"}, "box"),
    ({"point_coords": "[[1,2,3]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[1,2]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[[1,2]]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[1,2],[3]]", "point_labels": "[1,1]"}, "point_coords"),
    ({"point_coords": "[]", "point_labels": "[]"}, "point_coords"),
    ({"point_coords": json.dumps([[1, 1]] * 65), "point_labels": json.dumps([1] * 65)},
     "point_coords"),
    ({"point_coords": "[[1,2]]", "point_labels": "[1,0]"}, "point_labels"),
    ({"point_coords": "[[1,2]]", "point_labels": "[[1]]"}, "point_labels"),
    ({"point_coords": "[[1,2]]", "point_labels": "[2]"}, "point_labels"),
    ({"point_coords": "[[1,2]]", "point_labels": '["1"]'}, "point_labels"),
    ({"point_coords": "[[1,2]]"}, "point_labels"),
    ({"point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[1,2", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[" * 100_000, "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[NaN,1]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[1e400,1]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": "[[" + "9" * 5000 + ",1]]", "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": '[["a","b"]]', "point_labels": "[1]"}, "point_coords"),
    ({"point_coords": '{"x": 1}', "point_labels": "[1]"}, "point_coords"),
    ({"box": "[1,2,3]"}, "box"),
    ({"box": "[[1,2,3,4],[1,2,3,4]]"}, "box"),
    ({"box": "null"}, "box"),
    ({"mask_input": "[[[0.5]]]"}, "mask_input"),
    ({"mask_input": json.dumps([[[0.0] * 16] * 15])}, "mask_input"),
    ({"mask_input": "[" * 50_000}, "mask_input"),
    ({}, "prompt"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_sam2_prompts_are_400_naming_the_field(runner, fields, field):
    r = post_image(runner, "/segment-anything-2", SAM_IMAGE, **{
        "point_coords": "", "point_labels": "", **fields})
    rejected(r, 400, field)


def test_sam2_point_on_the_image_border_is_served(runner):
    r = post_image(runner, "/segment-anything-2", SAM_IMAGE, point_coords="[[48,32]]",
                   point_labels="[1]")
    assert r.status_code == 200, r.text[:300]


def test_sam2_mask_input_over_the_form_field_limit_is_400(runner):
    huge = "[[[" + ",".join(["0.123456"] * (1_200_000)) + "]]]"  # ~10 MB, one field
    r = post_image(runner, "/segment-anything-2", SAM_IMAGE, mask_input=huge)
    rejected(r, (400, 413), "size")


# -- huge prompts and counts past the caps ---------------------------------------------------------

def test_megabyte_prompts_are_refused_cheaply(runner):
    huge = "a cat " * 500_000  # 3 MB
    r = runner.post("/text-to-image", json={"prompt": huge, "width": 64, "height": 64})
    rejected(r, 422, "20000")
    r = runner.post("/text-to-image", json={"prompt": "x", "negative_prompt": huge})
    rejected(r, 422, "20000")
    r = post_image(runner, "/image-to-text", support.noise_png(), prompt=huge[:2_000_000])
    rejected(r, 422, "1000")
    r = post_image(runner, "/image-to-image", support.noise_png(), prompt=huge[:2_000_000])
    rejected(r, 422, "20000")
    r = post_image(runner, "/upscale", support.noise_png(), prompt=huge[:2_000_000])
    rejected(r, 422, "20000")


def test_megabyte_chat_message_is_400_naming_the_context(runner):
    r = runner.post("/llm", json={"messages": [{"role": "user", "content": "hello " * 200_000}],
                                  "max_tokens": 1})
    rejected(r, 400, "tokens")


def test_many_pipes_in_a_prompt_are_400(runner):
    r = runner.post("/text-to-image", json={"prompt": "a|b|c|d", "width": 64, "height": 64,
                                            "num_inference_steps": 1})
    rejected(r, 400, "prompts")


@pytest.mark.parametrize("route, body, field", [
    ("/text-to-image", {"num_images_per_prompt": 9}, "num_images_per_prompt"),
    ("/text-to-image", {"num_images_per_prompt": 10**9}, "num_images_per_prompt"),
    ("/text-to-image", {"num_images_per_prompt": -1}, "num_images_per_prompt"),
    ("/text-to-image", {"width": 2056, "height": 64}, "width"),
    ("/text-to-image", {"width": 64, "height": 10**12}, "height"),
    ("/text-to-image", {"width": 0, "height": 64}, "width"),
    ("/text-to-image", {"width": 60, "height": 64}, "width"),
    ("/text-to-image", {"num_inference_steps": 151}, "num_inference_steps"),
    ("/text-to-image", {"num_inference_steps": 0}, "num_inference_steps"),
    ("/text-to-image", {"guidance_scale": 1e308}, "guidance_scale"),
    ("/text-to-image", {"seed": 2**64}, "seed"),
    ("/text-to-image", {"seed": -1}, "seed"),
    ("/llm", {"max_tokens": 0}, "max_tokens"),
    ("/llm", {"temperature": 2.5}, "temperature"),
    ("/llm", {"top_k": 0}, "top_k"),
    ("/llm", {"stop": ["x"] * 17}, "stop"),
])
def test_numbers_past_the_caps_are_refused_naming_the_field(runner, route, body, field):
    """A 422 naming the field, or on /llm (whose go-livepeer worker ignores a 422) a 400 whose
    message starts with it."""
    base = ({"prompt": "x", "width": 64, "height": 64} if route == "/text-to-image"
            else {"messages": [{"role": "user", "content": "hi"}]})
    r = runner.post(route, json={**base, **body})
    support.check_answer(r, (route, body))
    if route == "/llm":
        assert rejected(r, 400).startswith(f"{field}: "), r.text[:300]
        return
    assert r.status_code == 422, r.text[:300]
    assert any(item["loc"][-1] == field for item in r.json()["detail"]), r.text[:300]
    support.error_message(r)


@pytest.mark.parametrize("fields, field", [
    ({"width": "2048", "height": "64"}, "width"), ({"width": "64", "height": "8"}, "height"),
    ({"width": "64", "height": "64", "num_inference_steps": "1000"}, "num_inference_steps"),
    ({"width": "64", "height": "64", "fps": "1000"}, "fps"),
    ({"width": "64", "height": "64", "motion_bucket_id": "-1"}, "motion_bucket_id"),
])
def test_video_sizes_past_the_caps_are_422(runner, fields, field):
    r = runner.post("/image-to-video", data=fields,
                    files={"image": ("a.png", support.noise_png(), "image/png")})
    assert r.status_code == 422, r.text[:300]
    assert any(item["loc"][-1] == field for item in r.json()["detail"]), r.text[:300]


def test_video_size_not_a_multiple_of_8_is_400(runner):
    r = post_image(runner, "/image-to-video", support.noise_png(), width=68)
    rejected(r, 400, "multiple of 8")


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-9])
def test_vanishing_temperature_is_greedy_not_a_crash(runner, temperature):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "temperature": temperature}
    assert runner.post("/llm", json=body).status_code == 200
    r = runner.post("/llm", json={**body, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    assert '"error"' not in r.text
