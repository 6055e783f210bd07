"""Media in and out: data URLs, image decoding with limits."""

from __future__ import annotations

import base64
import io
import itertools
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from runner.errors import BadRequest, UnsupportedMedia

if TYPE_CHECKING:
    import numpy as np
    from av.audio.stream import AudioStream
    from av.container import InputContainer
    from numpy.typing import ArrayLike


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def png_data_url(image: Image.Image, compress_level: int = 1) -> str:
    """PNG at a fast compression level: level 1 is several times faster than the default 6
    at a few percent more bytes. Call from a worker thread, never the event loop."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return data_url("image/png", buf.getvalue())


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
    if problem := incomplete(sniff(data), data):
        raise BadRequest(f"the uploaded image data is truncated: {problem}")
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
        if "truncated" in str(exc).lower():
            raise BadRequest(f"the uploaded image data is truncated: {exc}") from exc
        raise BadRequest(f"the uploaded image could not be decoded: {exc}") from exc


def _png_cut_short(data: bytes) -> str | None:
    """Walks the chunks: a file that ends inside one, or before IEND, was cut short; a chunk
    whose type is not four letters is damage, which the decoder names."""
    offset = 8
    while True:
        if offset + 8 > len(data):
            return "the PNG ends before its IEND chunk"
        length, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        if not kind.isalpha():
            return None
        if offset + 12 + length > len(data):
            return f"the PNG ends inside its {kind.decode()} chunk"
        if kind == b"IEND":
            return None
        offset += 12 + length


def sniff(data: bytes) -> str | None:
    """The image format of the formats `incomplete` checks, from its first bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def incomplete(image_format: str | None, data: bytes) -> str | None:
    """What Pillow decodes without a word from a file cut short: a PNG without its end chunk
    (the pixels may all be there, or filled in), a GIF without its trailer, a WebP shorter than
    its RIFF header says."""
    if image_format == "PNG":
        return _png_cut_short(data)
    if image_format == "GIF" and not data.rstrip(b"\0").endswith(b";"):
        return "the GIF ends before its trailer"
    if image_format == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "the WebP is shorter than its RIFF header says"
    return None


def decode_audio(data: bytes, rate: int = 16_000,
                 max_seconds: float | None = None) -> np.ndarray:
    """Any container PyAV (FFmpeg) reads (wav, flac, mp3, mp4/m4a, webm, ogg) as mono float32
    samples at `rate`. 415 for anything undecodable; 400 once the decoded audio passes
    `max_seconds`, checked while decoding so a long file is never decoded whole."""
    import av
    import numpy as np

    if not data:
        raise UnsupportedMedia("the uploaded audio is empty")
    if problem := audio_cut_short(data):
        raise BadRequest(f"the audio stream ends before its declared length: {problem}")
    limit = None if max_seconds is None else int(max_seconds * rate)
    chunks, total, declared = [], 0, None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next(iter(container.streams.audio), None)
            if stream is None:
                raise UnsupportedMedia("the uploaded file has no audio stream")
            declared = declared_seconds(container, stream)
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
        if total or declared:  # the header was read, the samples stop: the rest is missing
            raise BadRequest(f"the audio stream ends before its declared length: it stops "
                             f"after {total / rate:.2f} s ({exc})") from exc
        raise UnsupportedMedia(f"the uploaded audio could not be decoded: {exc}") from exc
    if total == 0:
        raise UnsupportedMedia("the uploaded audio holds no samples")
    if declared and declared - total / rate > max(CUT_TOLERANCE_S, 0.02 * declared):
        raise BadRequest(f"the audio stream ends before its declared length: {declared:.2f} s "
                         f"declared, {total / rate:.2f} s in the upload")
    return np.concatenate(chunks).astype(np.float32, copy=False)


# Codecs' priming and padding make a whole file decode a few ms short of (or past) the length
# its container declares.
CUT_TOLERANCE_S = 0.1


def declared_seconds(container: InputContainer, stream: AudioStream) -> float | None:
    """The length the container's header declares, where it declares one."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        import av

        return container.duration / av.time_base
    return None


def audio_cut_short(data: bytes) -> str | None:
    """Cut-off uploads FFmpeg decodes, or fails on, without saying so: a WAV whose data chunk
    is shorter than its header declares (FFmpeg trusts the bytes there are), an MP4/M4A
    without the 'moov' box that indexes it (kept at the end by many encoders)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _wav_cut_short(data)
    if data[4:8] == b"ftyp" and b"moov" not in data:
        return "the MP4/M4A has no 'moov' box (it is written last: the upload was cut off)"
    if data[:4] == b"OggS":
        return _ogg_cut_short(data)
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return _webm_cut_short(data)
    return _mp3_cut_short(data)


def _mp3_cut_short(data: bytes) -> str | None:
    """An MP3's Xing/Info header (in its first frame) declares the stream's bytes."""
    start = 10 + _syncsafe(data[6:10]) if data[:3] == b"ID3" else 0  # an ID3v2 tag first
    if start > len(data):
        return "the MP3's ID3 tag is cut off"
    head = data[start:start + 64]
    tag = max(head.find(b"Xing"), head.find(b"Info"))
    if not head.startswith(b"\xff") or tag < 0 or len(head) < tag + 16:
        return None
    flags = int.from_bytes(head[tag + 4:tag + 8], "big")
    if not flags & 0x2:  # no byte count
        return None
    offset = tag + 8 + (4 if flags & 0x1 else 0)
    declared, held = int.from_bytes(head[offset:offset + 4], "big"), len(data) - start
    if declared > held:
        return f"the MP3 header declares {declared} bytes, the upload holds {held}"
    return None


def _syncsafe(four: bytes) -> int:
    return int.from_bytes(bytes(b & 0x7F for b in four), "big") if len(four) == 4 else 0


def _webm_cut_short(data: bytes) -> str | None:
    """A WebM/Matroska file is its EBML header and one Segment element of declared size."""
    _, size, body = _ebml_element(data, 0)
    if size is None:
        return None
    element, size, body = _ebml_element(data, body + size)
    if element != b"\x18\x53\x80\x67" or size is None:  # not a Segment, or of unknown size
        return None
    if body + size > len(data):
        return f"the WebM segment declares {size} bytes, the upload holds {len(data) - body}"
    return None


def _ebml_element(data: bytes, offset: int) -> tuple[bytes, int | None, int]:
    """(ID, data size or None when unknown or unreadable, where its data starts)."""
    if offset >= len(data):
        return b"", None, offset
    id_length = _vint_length(data[offset])
    size_at = offset + id_length
    if size_at >= len(data):
        return b"", None, offset
    length = _vint_length(data[size_at])
    raw = data[size_at:size_at + length]
    if len(raw) < length:
        return data[offset:size_at], None, offset
    value = int.from_bytes(raw, "big") & ((1 << (7 * length)) - 1)
    unknown = value == (1 << (7 * length)) - 1
    return data[offset:size_at], None if unknown else value, size_at + length


def _vint_length(first: int) -> int:
    """EBML variable-size integers: the position of the first set bit gives the length."""
    return next((i + 1 for i in range(8) if first & (0x80 >> i)), 8)


def _ogg_cut_short(data: bytes) -> str | None:
    """Ogg pages are self-delimiting and the last one carries the end-of-stream flag."""
    offset, flags = 0, 0
    while offset < len(data):
        if data[offset:offset + 4] != b"OggS" or data[offset + 4:offset + 5] not in (b"", b"\0"):
            return None  # not a page (version 0): damaged, not short; FFmpeg says what it can
        if offset + 27 > len(data) or offset + 27 + data[offset + 26] > len(data):
            return "the last Ogg page is cut off"
        segments = data[offset + 27:offset + 27 + data[offset + 26]]
        flags, offset = data[offset + 5], offset + 27 + len(segments) + sum(segments)
    if offset > len(data):
        return "the last Ogg page is cut off"
    return None if flags & 0x04 else "the Ogg stream ends before its last page"


def _wav_cut_short(data: bytes) -> str | None:
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8],
                                                               "little")
        if chunk == b"data":
            held = len(data) - offset - 8
            if size not in (0, 0xFFFFFFFF) and size > held:  # 0 / -1: written while streaming
                return f"the WAV header declares {size} bytes of samples, the upload holds {held}"
            return None
        offset += 8 + size + (size & 1)
    return None


def wav_data_url(samples: ArrayLike, rate: int) -> str:
    """16-bit PCM WAV of float samples in [-1, 1] (mono, or frames x channels)."""
    import numpy as np
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1, 1), rate,
                    format="WAV", subtype="PCM_16")
    return data_url("audio/wav", buf.getvalue())
