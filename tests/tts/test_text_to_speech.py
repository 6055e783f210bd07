"""text-to-speech in tiny mode (Parler-TTS with a tiny Encodec codec); runs in .venv-tts only."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile

from pipelines import text_to_speech as tts
from runner.context import RunContext
from runner.device import Device
from runner.hub import ModelFiles
from runner.settings import Settings
from runner.spec import discover
from tests.conftest import serving
from tests.support.contract import assert_valid

MINI = "parler-tts/parler-tts-mini-v1"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny-models-tts"


@pytest.fixture(scope="module")
def client(tiny_dir):
    with serving("text-to-speech", tiny_dir) as c:
        yield c


@pytest.fixture(scope="module")
def entry(client):
    return client.app.state.service.registry.default("text-to-speech")


def decode_wav(url: str) -> tuple[np.ndarray, int]:
    prefix = "data:audio/wav;base64,"
    assert url.startswith(prefix), url[:40]
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(url[len(prefix):])),
                                   dtype="float32")
    return samples, rate


def speak(client, body: dict, **kwargs) -> tuple[np.ndarray, int]:
    r = client.post("/text-to-speech", json=body, **kwargs)
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "AudioResponse")
    return decode_wav(r.json()["audio"]["url"])


def tiny_rate(tiny_dir, entry) -> int:
    folder = ModelFiles(tiny_dir, entry.id).folder(entry.main.repo)
    config = json.loads((folder / "config.json").read_text())
    return config["audio_encoder"]["sampling_rate"]


# -- the route -----------------------------------------------------------------------------

def test_served_here():
    assert "text-to-speech" in discover()


def test_hello(client, tiny_dir, entry):
    r = client.post("/text-to-speech", json={"text": "Hello there."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "AudioResponse")
    assert set(body) == {"audio"} and set(body["audio"]) == {"url"}
    samples, rate = decode_wav(body["audio"]["url"])
    assert samples.ndim == 1 and samples.size > 0  # mono
    assert rate == tiny_rate(tiny_dir, entry) == 24000
    assert "generate;dur=" in r.headers["Server-Timing"]
    assert "encode;dur=" in r.headers["Server-Timing"]


def test_trailing_slash_and_description(client):
    samples, _ = speak(client, {"text": "Hello.", "description": "A female speaker."})
    assert samples.size > 0
    r = client.post("/text-to-speech/", json={"text": "Hello."})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [{"text": ""}, {}, {"text": "   \n"},
                                  {"text": "x", "description": "d" * 2001}])
def test_422_schema(client, body):
    r = client.post("/text-to-speech", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert_valid(r.json(), "HTTPValidationError")


def test_400_over_hard_cap(client, entry):
    limit = entry.options["max_characters"]
    r = client.post("/text-to-speech", json={"text": "a" * (limit + 1)})
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "HTTPError")
    assert str(limit) in r.json()["detail"]["msg"]
    assert str(limit + 1) in r.json()["detail"]["msg"]


def test_at_hard_cap_is_accepted(client, entry, monkeypatch):
    """Exactly max_characters is fine (generation stubbed: only the cap is under test)."""
    monkeypatch.setattr(tts, "generate_piece",
                        lambda model, description, text, seed: np.zeros(10, np.float32))
    samples, _ = speak(client, {"text": "a" * entry.options["max_characters"]})
    assert samples.size > 0


def test_long_text_is_read_in_pieces(client, entry):
    """Six 149-character sentences with 300-character pieces: two sentences a piece, three
    pieces. Every tiny piece is exactly as long (min = max new tokens), so the duration is
    3 pieces + 2 pauses, to the sample."""
    chunk = entry.options["chunk_characters"]
    words = ("lorem ipsum dolor sit amet " * 40).split()
    sentence = ""
    for word in words:
        if len(sentence) + len(word) + 2 > chunk // 2:
            break
        sentence = f"{sentence} {word}".strip()
    sentence += "."
    assert 2 * len(sentence) + 1 <= chunk < 3 * len(sentence) + 2
    text = " ".join([sentence] * 6)
    assert len(text) >= 2.9 * chunk

    one, rate = speak(client, {"text": "Hello there."})
    long, _ = speak(client, {"text": text})
    pause = round(entry.options["pause_seconds"] * rate)
    assert one.size > pause
    assert long.size == 3 * one.size + 2 * pause
    # the pauses are silent
    assert not np.any(long[one.size:one.size + pause])


def test_unknown_model_id(client):
    r = client.post("/text-to-speech", json={"text": "Hi.", "model_id": "nope/nope"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "model_id"


def test_mini_loads_on_demand(client):
    def mini_state():
        models = {m["id"]: m for m in client.get("/models").json()["models"]}
        return models.get(MINI, {}).get("state")

    assert mini_state() != "ready"  # only the default is warmed up
    samples, rate = speak(client, {"text": "Hello there.", "model_id": MINI})
    assert samples.size > 0 and rate == 24000
    assert mini_state() == "ready"


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/x-www-form-urlencoded"}])
def test_curl_style_body(client, headers):
    """`curl -X POST .../text-to-speech -d '{"text":...}'` sends a form content type."""
    r = client.post("/text-to-speech", content=b'{"text":"Hello there."}', headers=headers)
    assert r.status_code == 200, r.text
    decode_wav(r.json()["audio"]["url"])


# -- run() directly ------------------------------------------------------------------------

def test_pieces_share_the_seed(client, tiny_dir, entry):
    """Three identical sentences in three pieces: same description, same seed, same audio."""
    entry = entry.model_copy(update={"options": {**entry.options, "chunk_characters": 12}})
    files = ModelFiles(tiny_dir, entry.id)
    model = tts.load(entry, files, Device("cpu"))
    ctx = RunContext(entry, Device("cpu"), files, Settings(tiny=True, device="cpu"))
    request = tts.TextToSpeechParams(text="Hello there. Hello there. Hello there.")
    samples, rate = decode_wav(tts.run(model, request, ctx).audio.url)
    pause = round(entry.options["pause_seconds"] * rate)
    piece = (samples.size - 2 * pause) // 3
    assert samples.size == 3 * piece + 2 * pause
    first = samples[:piece]
    second = samples[piece + pause:2 * piece + pause]
    third = samples[2 * (piece + pause):]
    assert np.any(first)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)
    assert set(ctx.timings) == {"generate", "encode"}
    # Not trivially equal: another request (another random seed) sounds different.
    again, _ = decode_wav(tts.run(model, request, ctx).audio.url)
    assert again.size == samples.size and np.any(again != samples)


def test_sampling_rate_comes_from_the_config(client, tiny_dir, entry):
    model = tts.load(entry, ModelFiles(tiny_dir, entry.id), Device("cpu"))
    assert model.sampling_rate == model.model.config.audio_encoder.sampling_rate == 24000
    assert model.model.decoder.config._attn_implementation == "sdpa"
    assert not model.model.training


class HalfPrecisionCpu(Device):
    """CUDA's code path (the entry's dtype) on the CPU: no GPU is needed to check that the
    model loads and runs in bfloat16."""

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def torch(self):
        import torch

        return torch.device("cpu")


def test_loads_and_runs_at_the_entry_dtype(client, tiny_dir, entry):
    import torch

    assert entry.dtype == "bfloat16"
    device = HalfPrecisionCpu("cpu")
    files = ModelFiles(tiny_dir, entry.id)
    model = tts.load(entry, files, device)
    assert model.model.dtype == torch.bfloat16
    assert model.model.decoder.config._attn_implementation == "sdpa"
    ctx = RunContext(entry, device, files, Settings(tiny=True, device="cpu"))
    samples, rate = decode_wav(tts.run(model, tts.TextToSpeechParams(text="Hi."), ctx).audio.url)
    assert samples.size > 0 and rate == 24000


# -- the splitter --------------------------------------------------------------------------

def test_split_short_text_is_one_piece():
    assert tts.split_text("  Hello   there.\n", 300) == ["Hello there."]


def test_split_packs_whole_sentences():
    text = "One two. Three four! Five six? Seven eight."
    assert tts.split_text(text, 20) == ["One two. Three four!", "Five six?", "Seven eight."]
    assert tts.split_text(text, 9) == ["One two.", "Three", "four!", "Five six?", "Seven",
                                       "eight."]


def test_split_boundaries():
    assert tts.sentences('He said "stop." Then left.\n\nNew paragraph without end') == \
        ['He said "stop."', "Then left.", "New paragraph without end"]
    assert tts.sentences("Version 2.5 is out... Really? Yes!") == \
        ["Version 2.5 is out...", "Really?", "Yes!"]
    assert tts.sentences("你好。再见！") == ["你好。", "再见！"]


def test_split_giant_sentence_at_words():
    sentence = " ".join(f"word{i}" for i in range(200)) + "."
    pieces = tts.split_text("Short one. " + sentence + " Tail.", 50)
    assert pieces[0] == "Short one."
    assert pieces[-1].endswith("Tail.") or pieces[-1] == "Tail."
    assert all(0 < len(p) <= 50 for p in pieces)
    assert all(not p.startswith(" ") and not p.endswith(" ") for p in pieces)
    assert " ".join(pieces).split() == ("Short one. " + sentence + " Tail.").split()


def test_split_giant_word_is_cut():
    pieces = tts.split_text("x" * 25 + " end.", 10)
    assert pieces == ["x" * 10, "x" * 10, "xxxxx end."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\n", ". . .", "a.b.c", "Hi!!! ... ?? ok"])
def test_split_never_empty(text):
    pieces = tts.split_text(text, 4)
    assert all(p.strip() and len(p) <= 4 for p in pieces)
    assert "".join(pieces).replace(" ", "") == "".join(text.split())


def test_speech_equals_the_plain_library_call(client, tiny_dir, entry, monkeypatch):
    """The runner's answer for one piece of text is the model card's own call, as written to a
    16-bit WAV, on the same weights and seed (the runner draws a seed per request: fixed
    here). The library call loads the folder with its default attention."""
    import torch
    from parler_tts import ParlerTTSForConditionalGeneration
    from transformers import AutoTokenizer

    monkeypatch.setattr(tts.secrets, "randbits", lambda bits: 7)
    text, description = "Hello there.", "A calm voice."
    ours, rate = speak(client, {"text": text, "description": description})
    folder = ModelFiles(tiny_dir, entry.id).folder(entry.main.repo)
    model = ParlerTTSForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(7)
    with torch.inference_mode():
        audio = model.generate(input_ids=tokenizer(description, return_tensors="pt").input_ids,
                               prompt_input_ids=tokenizer(text, return_tensors="pt").input_ids)
    buf = io.BytesIO()
    soundfile.write(buf, audio.cpu().numpy().reshape(-1), model.config.sampling_rate,
                    format="WAV", subtype="PCM_16")
    theirs, their_rate = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32")
    assert rate == their_rate and np.array_equal(ours, theirs)
