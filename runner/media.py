"""Media in and out: data URLs, image decoding with limits."""

from __future__ import annotations

import base64
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from runner.errors import BadRequest


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def png_data_url(image: Image.Image, compress_level: int = 1) -> str:
    """PNG at a fast compression level: level 1 is several times faster than the default 6
    at a few percent more bytes. Call from a worker thread, never the event loop."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return data_url("image/png", buf.getvalue())


def decode_data_url(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError("not a base64 data URL")
    return header[5:-7], base64.b64decode(payload)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image with EXIF orientation applied; 400 for anything undecodable or bigger
    than `max_pixels` (decompression bombs included)."""
    if not data:
        raise BadRequest("the uploaded image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels or width == 0 or height == 0:
                raise BadRequest(
                    f"image of {width}x{height} pixels is outside the limit of {max_pixels} pixels"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except BadRequest:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"the uploaded image could not be decoded: {exc}") from exc
