"""audio-to-text end to end in tiny mode: a random-weight Whisper loaded from the folder
build_tiny writes, run by transformers' ASR pipeline, fed uploads that these tests encode in every
container the runner takes, sent as go-livepeer's multipart writer sends them. The transcripts
are noise: the tests check structure, never words."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import av
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from pipelines import audio_to_text
from runner.registry import ModelEntry
from runner.settings import Settings
from tests.conftest import png_bytes, serving
from tests.support.contract import assert_valid
from tests.support.helpers import hook_replaced

# (container format, encoder, file name, content type) for every container the runner takes.
CONTAINERS = [
    ("wav", "pcm_s16le", "speech.wav", "audio/wav"),
    ("flac", "flac", "speech.flac", "audio/flac"),
    ("mp3", "libmp3lame", "speech.mp3", "audio/mpeg"),
    ("mp4", "aac", "speech.mp4", "audio/mp4"),
    ("ipod", "aac", "speech.m4a", "audio/mp4"),  # .m4a is the "ipod" muxer
    ("webm", "libopus", "speech.webm", "audio/webm"),
    ("ogg", "libopus", "speech.ogg", "audio/ogg"),
]


def speechlike(seconds: float, rate: int) -> np.ndarray:
    """Voiced-sounding audio: a 140 Hz buzz with harmonics, syllable-like bursts, some noise."""
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.2 * voice * envelope + 0.01 * noise).astype(np.float32)


def encode(fmt: str = "wav", codec: str = "pcm_s16le", seconds: float = 2.0,
           rate: int = 48_000) -> bytes:
    """`seconds` of audio in a container, in memory; PyAV converts the float frames to the
    encoder's own sample format."""
    samples = speechlike(seconds, rate)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, samples.size, 960):
            frame = av.AudioFrame.from_ndarray(samples[start:start + 960].reshape(1, -1),
                                               format="flt", layout="mono")
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


WAV = encode()


def post(client, audio: bytes | None = WAV, name: str = "speech.wav",
         content_type: str = "audio/wav", path: str = "/audio-to-text", **fields):
    files = None if audio is None else {"audio": (name, audio, content_type)}
    return client.post(path, data={k: str(v) for k, v in fields.items()}, files=files)


def transcribe(client, audio: bytes = WAV, **fields) -> dict:
    r = post(client, audio, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "TextResponse")
    return body


def assert_chunks(chunks: list[dict]) -> None:
    for chunk in chunks:
        assert set(chunk) == {"timestamp", "text"} and isinstance(chunk["text"], str)
        start, end = chunk["timestamp"]
        assert isinstance(start, float) and (end is None or isinstance(end, float))
        assert start >= 0 and (end is None or end >= start)


def go_multipart(parts: dict[str, str], audio: bytes, filename: str = "audio.mp3"
                 ) -> tuple[bytes, str]:
    """A body as Go's mime/multipart writer makes it (CreateFormFile, WriteField): CRLF lines,
    the file part as application/octet-stream, every other value a string."""
    boundary = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e"
    out = io.BytesIO()
    out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; "
              f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
              .encode())
    out.write(audio + b"\r\n")
    for name, value in parts.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                  f"{value}\r\n".encode())
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> Iterator[TestClient]:
    """The audio-to-text app in tiny mode; its warm-up builds and loads the tiny Whisper."""
    with serving("audio-to-text", tmp_path_factory.getbasetemp() / "tiny-models-asr") as c:
        yield c


@pytest.fixture(scope="module")
def limited(asr, tmp_path_factory) -> Iterator[TestClient]:
    """The same checkpoint behind a models.yaml capping audio at 1 s, and a 256 KiB body cap."""
    spec = yaml.safe_load(Settings().models_file.read_text())
    group = spec["pipelines"]["audio-to-text"]
    for model in group["models"]:
        model["options"] = {**model.get("options", {}), "max_seconds": 1}
    models_file = tmp_path_factory.mktemp("asr-limited") / "models.yaml"
    models_file.write_text(yaml.safe_dump({"safety_checker": spec["safety_checker"],
                                           "pipelines": {"audio-to-text": group}}))
    with serving("audio-to-text", asr.app.state.service.model_dir, models_file=models_file,
                 max_upload_bytes=256 * 1024) as client:
        yield client


@pytest.mark.parametrize("fmt, codec, name, content_type", CONTAINERS,
                         ids=[c[2].split(".")[1] for c in CONTAINERS])
def test_every_container_is_transcribed(asr, fmt, codec, name, content_type):
    body = transcribe(asr, encode(fmt, codec), name=name, content_type=content_type)
    assert isinstance(body["text"], str)
    assert body["chunks"], "segment timestamps are the default"
    assert_chunks(body["chunks"])


@pytest.mark.parametrize("value", ["true", "1", "sentence", "TRUE", "Sentence"])
def test_segment_timestamps(asr, value):
    body = transcribe(asr, return_timestamps=value)
    assert body["chunks"]
    assert_chunks(body["chunks"])
    # Segments, not words: the chunks put together make up the whole text.
    assert "".join(c["text"] for c in body["chunks"]).strip() == body["text"].strip()


def test_a_missing_end_timestamp_is_null_not_an_error():
    # Whisper gives (start, None) when it predicted no closing timestamp.
    chunk = audio_to_text.to_chunk({"timestamp": (29.98, None), "text": " x"})
    assert chunk.model_dump() == {"timestamp": [29.98, None], "text": " x"}
    assert audio_to_text.to_chunk({"timestamp": (0.0, 1.004), "text": ""}).timestamp == [0, 1.0]


def test_word_timestamps_and_sdpa_afterwards(asr, monkeypatch):
    seen = []
    real = audio_to_text.run

    def spy(model, request, ctx):
        response = real(model, request, ctx)
        seen.append(model.model.config._attn_implementation)
        return response

    with hook_replaced(asr.app.state.service.specs["audio-to-text"], "run", spy):
        words = transcribe(asr, return_timestamps="word")
        segments = transcribe(asr, return_timestamps="true")
    assert words["chunks"] and segments["chunks"]
    assert_chunks(words["chunks"])
    # transformers leaves the model on eager attention after a word request; run() restores it.
    assert seen == ["sdpa", "sdpa"]


@pytest.mark.parametrize("value", ["false", "0", "FALSE"])
def test_no_timestamps_no_chunks(asr, value):
    body = transcribe(asr, return_timestamps=value)
    assert body["chunks"] == [] and isinstance(body["text"], str)


def test_long_audio_is_chunked(asr):
    body = transcribe(asr, encode(seconds=40, rate=16_000), name="long.wav")
    assert_chunks(body["chunks"])
    # One window's timestamps stop at 30 s; later ones are offset by where their window starts.
    assert max(c["timestamp"][0] for c in body["chunks"]) > 30


@pytest.mark.parametrize("metadata", ["{}", '{"job": "abc", "n": 1}', "", "null"])
def test_metadata_json_is_accepted(asr, metadata):
    transcribe(asr, metadata=metadata)


@pytest.mark.parametrize("metadata", ["{not json", "{'single': 'quotes'}"])
def test_metadata_not_json_is_400(asr, metadata):
    r = post(asr, metadata=metadata)
    assert r.status_code == 400, r.text
    assert "metadata" in r.json()["detail"]["msg"]
    assert_valid(r.json(), "HTTPError")


@pytest.mark.parametrize("fields", [{"return_timestamps": "segment"},
                                   {"return_timestamps": "yes"},
                                   {"model_id": "nobody/nothing"}])
def test_bad_fields_are_422(asr, fields):
    r = post(asr, **fields)
    assert r.status_code == 422, r.text
    assert_valid(r.json(), "HTTPValidationError")
    assert r.json()["detail"][0]["loc"][-1] in fields


def test_missing_audio_is_422(asr):
    r = post(asr, None, return_timestamps="true")
    assert r.status_code == 422, r.text
    assert any(item["loc"][-1] == "audio" for item in r.json()["detail"])


@pytest.mark.parametrize("data", [b"not audio at all" * 10, b"RIFF\x00\x00", b"", png_bytes()],
                         ids=["text", "truncated-wav", "empty", "png"])
def test_undecodable_audio_is_415(asr, data):
    r = post(asr, data)
    assert r.status_code == 415, r.text
    assert isinstance(r.json()["detail"]["msg"], str)
    assert_valid(r.json(), "HTTPError")


def test_audio_over_the_model_limit_is_400(limited):
    assert transcribe(limited, encode(seconds=0.5))["chunks"]
    r = post(limited, encode(seconds=3, rate=16_000))  # 96 KB: under the body cap
    assert r.status_code == 400, r.text
    assert "limit of 1 s" in r.json()["detail"]["msg"]


def test_upload_over_the_body_limit_is_413(limited):
    r = post(limited, encode(seconds=4))  # 384 KB of 16-bit PCM
    assert r.status_code == 413, r.text
    assert "limit" in r.json()["detail"]["msg"]


def test_go_multipart_body(asr):
    body, content_type = go_multipart(
        {"model_id": "", "return_timestamps": "word", "metadata": json.dumps({"id": 7})},
        encode("mp3", "libmp3lame"))
    r = asr.post("/audio-to-text/", content=body, headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "TextResponse")
    assert_chunks(r.json()["chunks"])


def test_model_id_selects_another_whisper(asr):
    # distil-large-v3 (25 s windows): its own tiny checkpoint, built and loaded on first use.
    body = transcribe(asr, encode(seconds=30, rate=16_000),
                      model_id="distil-whisper/distil-large-v3")
    assert_chunks(body["chunks"])
    # 30 s is one window for the 30 s models; here a second window starts, its times offset.
    assert max(c["timestamp"][0] for c in body["chunks"]) > 30


def test_server_timing_names_each_stage(asr):
    r = post(asr)
    assert r.status_code == 200, r.text
    stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert {"model", "decode", "transcribe"} <= set(stages)


def test_entry_options_reach_the_pipeline():
    entry = ModelEntry(id="a/b", kind="whisper", options={
        "max_seconds": 60, "generate_kwargs": {"num_beams": 2}})
    assert audio_to_text.max_seconds(entry) == 60
    assert audio_to_text.max_seconds(ModelEntry(id="a/b", kind="whisper")) == 7200
    assert audio_to_text.generate_kwargs(entry, True) == {
        "num_beams": 2, "force_unique_generate_call": True}
    assert audio_to_text.generate_kwargs(entry, "word")["force_unique_generate_call"] is False


def test_tiny_tokenizer_puts_timestamps_after_notimestamps():
    tokenizer = audio_to_text.tiny_tokenizer()
    first = tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
    assert tokenizer.convert_ids_to_tokens([first, first + 1500]) == ["<|0.00|>", "<|30.00|>"]
    assert tokenizer.decode(tokenizer.encode(" hello world", add_special_tokens=False)) \
        == " hello world"
