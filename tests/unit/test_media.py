"""runner.media: image decoding with limits, data URLs."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from runner.errors import BadRequest
from runner.media import data_url, decode_image, png_data_url
from tests.support.helpers import decode_data_url

LIMIT = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 40, height: int = 20) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 6 % 256, y * 12 % 256, 100) for y in range(height) for x in range(width)])
    return image


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (CRC fixed up): a bomb's header, in 70 bytes."""
    data = bytearray(encode(Image.new("1", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# -- decoding ------------------------------------------------------------------------------------

def test_png_decodes_to_rgb_with_same_pixels():
    original = gradient()
    image = decode_image(encode(original), LIMIT)
    assert image.mode == "RGB" and image.size == (40, 20)
    assert image.tobytes() == original.tobytes()


def test_jpeg_decodes_to_rgb():
    image = decode_image(encode(gradient(), "JPEG", quality=95), LIMIT)
    assert image.mode == "RGB" and image.size == (40, 20)
    r, g, b = image.getpixel((10, 10))
    assert abs(r - 60) < 12 and abs(g - 120) < 12 and abs(b - 100) < 12


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    original = gradient(40, 20)
    original.paste((255, 0, 0), (0, 0, 8, 8))  # a red mark in the top-left corner as stored
    data = encode(original, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    image = decode_image(data, LIMIT)
    assert image.size == (20, 40)
    r, g, b = image.getpixel((16, 3))  # orientation 6 moves the top-left corner top-right
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "1", "L", "RGBA"])
def test_other_modes_come_out_rgb(mode):
    image = Image.new(mode, (12, 10))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really has that mode
    out = decode_image(data, LIMIT)
    assert out.mode == "RGB" and out.size == (12, 10)


def test_palette_colours_survive():
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    out = decode_image(encode(image), LIMIT)
    assert out.getpixel((1, 1)) == (10, 200, 30)
    assert out.getpixel((0, 0)) == (0, 0, 0)


# -- refusals ------------------------------------------------------------------------------------

def refused(data: bytes, max_pixels: int = LIMIT) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        decode_image(data, max_pixels)
    assert info.value.status_code == 400
    return info.value


def test_empty_bytes_are_refused():
    assert "empty" in refused(b"").msg


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n", b"\x00" * 100,
                                  b"GIF89a" + b"\xff" * 20])
def test_garbage_is_refused(data):
    refused(data)


def test_truncated_png_is_refused():
    data = encode(gradient(64, 64))
    refused(data[: len(data) // 2])


def test_truncated_jpeg_is_refused():
    data = encode(gradient(64, 64), "JPEG")
    refused(data[: len(data) // 3])


def test_image_over_max_pixels_is_refused_with_the_limit():
    error = refused(encode(gradient(40, 20)), max_pixels=799)
    assert "799" in error.msg and "40x20" in error.msg
    assert decode_image(encode(gradient(40, 20)), 800).size == (40, 20)  # exactly at the limit


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images whose pixels were decoded (ImageFile.load), in order."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(image):
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


@pytest.mark.parametrize("side", [20_000, 10_000, 100_000])
def test_decompression_bomb_is_refused_from_its_header(side, decoded):
    """Refused fast: from the size its header declares, no pixel decoded."""
    bomb = png_declaring(side, side)
    assert len(bomb) < 200
    refused(bomb, max_pixels=10**12)  # Pillow's own bomb guard, not our limit
    refused(bomb)  # our limit
    assert decoded == []


def test_real_compressed_bomb_is_refused_from_its_header(decoded):
    """A genuine 5000x5000 1-bit PNG: 75 MB once decoded to RGB, a few KB on the wire."""
    data = encode(Image.new("1", (5000, 5000)), compress_level=9)
    assert len(data) < 100_000
    error = refused(data)
    assert "5000x5000" in error.msg and str(LIMIT) in error.msg
    assert decoded == []
    assert decode_image(encode(gradient(40, 20)), LIMIT) and set(decoded) == {(40, 20)}  # spy


# -- data URLs -----------------------------------------------------------------------------------

def test_png_data_url_round_trips():
    original = gradient()
    url = png_data_url(original)
    assert url.startswith("data:image/png;base64,")
    mime, payload = decode_data_url(url)
    assert mime == "image/png"
    assert decode_image(payload, LIMIT).tobytes() == original.tobytes()


@pytest.mark.parametrize("level", [0, 9])
def test_png_data_url_compression_levels_decode_the_same(level):
    original = gradient()
    _, payload = decode_data_url(png_data_url(original, compress_level=level))
    assert decode_image(payload, LIMIT).tobytes() == original.tobytes()


def test_data_url_round_trips_any_bytes():
    payload = bytes(range(256))
    assert decode_data_url(data_url("application/octet-stream", payload)) == (
        "application/octet-stream", payload)


@pytest.mark.parametrize("url", ["image/png;base64,AAAA", "data:image/png,AAAA",
                                 "http://example.com/x.png"])
def test_decode_data_url_rejects_non_data_urls(url):
    with pytest.raises(ValueError):
        decode_data_url(url)


def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    png = encode(Image.new("RGB", (8, 8)))
    at = png.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(payload)) + kind + payload
    return png[:at] + chunk + struct.pack(">I", zlib.crc32(kind + payload)) + png[at:]


def test_corrupt_exif_is_a_bad_request_not_a_crash():
    data = png_with_chunk(b"eXIf", b"\xff" * 30)
    try:
        decode_image(data, LIMIT)
    except BadRequest:
        return  # refusing it is fine; decoding it without the EXIF would be fine too
    except Exception as exc:
        pytest.fail(f"corrupt EXIF escaped as {type(exc).__name__}: {exc}")


def test_valid_png_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    data = encode(gradient(40, 20), exif=exif.tobytes())
    assert decode_image(data, LIMIT).size == (20, 40)


def test_postscript_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(BadRequest, match="not an image format"):
        decode_image(eps, 1 << 20)
