"""Media in and out: data URLs, image decoding with limits."""

from __future__ import annotations

import base64
import io
import itertools
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from runner.errors import BadRequest, UnsupportedMedia


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


# Raster formats only: Pillow would otherwise hand EPS/PS uploads to Ghostscript when installed.
# (JPEG covers multi-picture MPO files from phones.)
Image.init()  # every plugin registered, so `formats=` finds them all
IMAGE_FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM",
                                  "TGA") if f in Image.OPEN)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image with EXIF orientation applied; 400 for anything undecodable or bigger
    than `max_pixels` (decompression bombs included)."""
    if not data:
        raise BadRequest("the uploaded image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels or width == 0 or height == 0:
                raise BadRequest(
                    f"image of {width}x{height} pixels is outside the limit of {max_pixels} pixels"
                )
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except BadRequest:
        raise
    except UnidentifiedImageError as exc:  # its message names a BytesIO object: say it plainly
        raise BadRequest("the uploaded image could not be decoded: not an image format this "
                         "runner reads (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"the uploaded image is outside the limit of {max_pixels} pixels: "
                         f"{exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"the uploaded image could not be decoded: {exc}") from exc


def decode_audio(data: bytes, rate: int = 16_000, max_seconds: float | None = None):
    """Any container PyAV (FFmpeg) reads (wav, flac, mp3, mp4/m4a, webm, ogg) as mono float32
    samples at `rate`. 415 for anything undecodable; 400 once the decoded audio passes
    `max_seconds`, checked while decoding so a long file is never decoded whole."""
    import av
    import numpy as np

    if not data:
        raise UnsupportedMedia("the uploaded audio is empty")
    limit = None if max_seconds is None else int(max_seconds * rate)
    chunks, total = [], 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise UnsupportedMedia("the uploaded file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            # One frame at a time (a list would decode the whole file before the length
            # check); the final None flushes the resampler.
            for frame in itertools.chain(container.decode(stream), [None]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if limit is not None and total > limit:
                    raise BadRequest(f"audio is longer than the limit of {max_seconds:g} s")
    except (BadRequest, UnsupportedMedia):
        raise
    except (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError) as exc:
        raise UnsupportedMedia(f"the uploaded audio could not be decoded: {exc}") from exc
    if total == 0:
        raise UnsupportedMedia("the uploaded audio holds no samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def wav_data_url(samples, rate: int) -> str:
    """16-bit PCM WAV of float samples in [-1, 1] (mono, or frames x channels)."""
    import numpy as np
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1, 1), rate,
                    format="WAV", subtype="PCM_16")
    return data_url("audio/wav", buf.getvalue())
