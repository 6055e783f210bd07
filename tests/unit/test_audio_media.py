"""Audio in and out: PyAV decoding to 16 kHz mono float32, WAV data URLs."""

import base64
import io

import av
import numpy as np
import pytest
import soundfile

from runner.errors import BadRequest, UnsupportedMedia
from runner.media import decode_audio, wav_data_url


def tone(seconds: float, rate: int = 44_100, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encode(fmt: str, codec: str, samples: np.ndarray, rate: int = 44_100) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        s16 = (samples * 32767).astype(np.int16)
        fmt_name = "s16" if codec != "libopus" and codec != "aac" else "fltp"
        for start in range(0, len(samples), frame_size):
            block = s16[start:start + frame_size] if fmt_name == "s16" \
                else samples[start:start + frame_size]
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format=fmt_name,
                                               layout="mono")
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize("fmt, codec", [("wav", "pcm_s16le"), ("flac", "flac"),
                                        ("mp4", "aac"), ("webm", "libopus")])
def test_decodes_containers_to_16k_mono(fmt, codec):
    rate = 48_000 if codec == "libopus" else 44_100
    samples = decode_audio(encode(fmt, codec, tone(1.0, rate), rate))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.size - 16_000) < 1_600  # codec priming/padding aside
    spectrum = np.abs(np.fft.rfft(samples[2000:14000]))
    assert abs(np.argmax(spectrum) * 16_000 / 12_000 - 440) < 10


def test_long_audio_is_400_with_the_limit():
    data = encode("wav", "pcm_s16le", tone(3.0))
    with pytest.raises(BadRequest, match="limit of 2 s"):
        decode_audio(data, max_seconds=2)
    assert decode_audio(data, max_seconds=5).size > 0


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 10, b"RIFF\x00\x00"])
def test_undecodable_audio_is_415(data):
    with pytest.raises(UnsupportedMedia):
        decode_audio(data)


def test_an_image_is_not_audio():
    from tests.conftest import png_bytes

    with pytest.raises(UnsupportedMedia):
        decode_audio(png_bytes())


def test_wav_data_url_round_trips():
    url = wav_data_url(tone(0.5, 24_000), 24_000)
    assert url.startswith("data:audio/wav;base64,")
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert rate == 24_000 and samples.shape == (12_000,)
    assert np.abs(samples - tone(0.5, 24_000)).max() < 1e-3
