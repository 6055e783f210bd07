"""Helpers of the hardening suite: the error contract every answer must keep, hostile media
builders, and the memory probe."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from functools import cache

import numpy as np
import psutil
from PIL import Image

from runner.errors import BUSY
from tests.support import golivepeer

# What a route outside go-livepeer's (/v1, /models) may answer with at all; 5xx only as busy.
ALLOWED = {200, 400, 401, 404, 405, 413, 415, 422, 503}


def error_message(response) -> str:
    """The message of an error answer, after checking its body has the contract's shape:
    `{"detail": {"msg": str}}`, or FastAPI's list shape for 422 (what the Go client decodes
    as HTTPValidationError), as tests/api/test_errors.py expects."""
    assert 400 <= response.status_code < 600, response.status_code
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"detail"}, body
    if response.status_code == 422:
        items = body["detail"]
        assert isinstance(items, list) and items, body
        for item in items:
            assert isinstance(item["loc"], list) and item["loc"], item
            assert all(isinstance(part, (str, int)) for part in item["loc"]), item
            assert isinstance(item["msg"], str) and item["msg"], item
            assert isinstance(item["type"], str) and item["type"], item
        return "; ".join(item["msg"] for item in items)
    assert isinstance(body["detail"], dict) and set(body["detail"]) == {"msg"}, body
    msg = body["detail"]["msg"]
    assert isinstance(msg, str) and msg.strip(), body
    return msg


def is_go_livepeer_route(request) -> bool:
    path = request.url.path
    return request.method == "POST" and not path.startswith(("/v1/", "/models"))


def check_answer(response, context: object = "") -> int:
    """An answer the caller can read: on a generate route only a status go-livepeer's client
    decodes there (the double in tests/support/golivepeer.py), elsewhere an HTTP one; every
    error in the contract's envelope; no 5xx but busy ("insufficient capacity" 500 on a
    generate route, 503 elsewhere), always with Retry-After: nothing a client sends may make
    the runner fail."""
    status = response.status_code
    if is_go_livepeer_route(response.request):
        golivepeer.survives(response.request.url.path, response)
    else:
        assert status in ALLOWED, f"{status} for {context!r}: {response.text[:500]}"
    if status >= 500:
        assert status in (500, 503), f"{status} for {context!r}: {response.text[:500]}"
        assert int(response.headers["retry-after"]) >= 1, (context, response.text[:500])
        if status == 500:
            assert error_message(response).startswith(BUSY), context
    if status >= 400:
        error_message(response)
    return status


def rejected(response, status: int | tuple[int, ...] = 400, *words: str) -> str:
    """An error answer with the expected status (or one of them), the contract's shape and a
    message that names each of `words` (case-insensitive)."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    msg = error_message(response)
    for word in words:
        assert word.lower() in msg.lower(), (word, msg)
    return msg


# -- images ----------------------------------------------------------------------------------

def image_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def noise_png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int = 1, color: int = 0, idat: bytes | None = None,
            extra: bytes = b"") -> bytes:
    """A PNG written by hand, so its header can claim any size: with `idat` None its pixel
    data is real (all zero rows, compressed), so a huge image stays tiny on disk."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    if idat is None:
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
        row = b"\0" * (1 + (width * depth * channels + 7) // 8)
        packer = zlib.compressobj(9)
        idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


@cache
def bomb_png(side: int = 30_000) -> bytes:
    """A 1-bit `side` x `side` PNG of zeros: 900 M pixels (2.7 GB as RGB) in about 100 KB."""
    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return raw_png(side, side, idat=idat)


def text_bomb_png() -> bytes:
    """A valid 8x8 PNG whose zTXt chunk inflates to 50 MB."""
    payload = zlib.compressobj(9)
    data = b"".join(payload.compress(b"a" * (1 << 20)) for _ in range(50)) + payload.flush()
    return raw_png(8, 8, extra=_chunk(b"zTXt", b"comment\0\0" + data))


def exif_rotated_jpeg(width: int = 40, height: int = 20, orientation: int = 6) -> bytes:
    """A `width` x `height` JPEG, left half red and right half blue, whose EXIF says to rotate
    it (6: 90 degrees clockwise on display)."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(image, "JPEG", exif=exif.tobytes(), quality=95)


# -- audio -----------------------------------------------------------------------------------

def wav(samples: np.ndarray, rate: int = 16_000, claimed_bytes: int | None = None) -> bytes:
    """16-bit mono WAV; `claimed_bytes` makes the header lie about the data size."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    size = len(data) if claimed_bytes is None else claimed_bytes
    return (b"RIFF" + struct.pack("<I", min(36 + size, 2**32 - 1)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", size) + data)


def tone(seconds: float = 0.5, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * 440 * t)


@cache
def flac_silence(seconds: int, rate: int = 8_000) -> bytes:
    """`seconds` of digital silence as FLAC: hours of audio in a few hundred KB."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        block = np.zeros((1, rate * 10), dtype=np.int16)
        for _ in range(seconds // 10):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


# -- memory ----------------------------------------------------------------------------------

def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def peak_rss() -> int:
    """The process's peak RSS so far (VmHWM), in bytes; falls back to the current RSS."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss()


def release_free_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc's malloc_trim), so
    that memory an earlier test freed cannot hide a new allocation from an RSS measurement."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs); False if it cannot."""
    release_free_memory()
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def json_field(value) -> str:
    return json.dumps(value)
