"""`python -m runner` as go-livepeer starts it: env configuration, the port bound before the
models load, tiny mode on a machine without a GPU, unknown optimisation flags tolerated."""

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import decode_png_url, png_bytes, wait_ready
from tests.support.helpers import free_port, patient, wait_until

# A process's start to its port answering, one tiny request, a stop: each takes seconds on a
# quiet machine (torch and the pipelines imported, a tiny model run), each waited for this long.
PROCESS_S = patient(15)


class Runner(tuple):
    """(url, log), and the process for tests that signal it."""

    def __new__(cls, url, log, proc):
        runner = super().__new__(cls, (url, log))
        runner.proc = proc
        return runner


@pytest.fixture
def runner_process(tmp_path, request):
    port = free_port()
    env = {**os.environ, "PIPELINE": "text-to-image", "HOST": "127.0.0.1", "PORT": str(port),
           "TINY_DIR": str(tmp_path / "tiny"), "SFAST": "true", "DEEPCACHE": "false",
           "BFLOAT16": "true", "MAX_NUM_SEQS": "64", "VERSION": "9.9.9", "AUTH_TOKEN": ""}
    env.pop("TINY", None)
    env.update(getattr(request, "param", {}))
    env.pop("DEVICE", None)
    log = open(tmp_path / "runner.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "runner"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    yield Runner(f"http://127.0.0.1:{port}", log, proc)
    stopping = time.monotonic()
    proc.terminate()
    # SIGTERM shuts down in order, unloads the models and exits 0 (not by the signal), with no
    # wait running out. That it fits go-livepeer's SIGKILL 8 s after it asked is a matter of
    # the machine: the settings are checked against it (test_containers) and the image check
    # times it; here it is printed.
    assert proc.wait(timeout=PROCESS_S) == 0
    print(f"SIGTERM to exit: {time.monotonic() - stopping:.1f} s")
    log.seek(0)
    text = log.read()
    assert "Application shutdown complete" in text and "cache event=closed" in text
    assert "timeout graceful shutdown exceeded" not in text
    log.close()


def first_answer(url: str, deadline: float) -> httpx.Response:
    while True:
        try:
            return httpx.get(f"{url}/version", timeout=1)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the port never answered"
            time.sleep(0.05)


def test_python_m_runner_serves_tiny_text_to_image(runner_process):
    url, log = runner_process
    version = first_answer(url, time.monotonic() + PROCESS_S).json()
    assert version == {"pipeline": "text-to-image", "model_id":
                       "SG161222/RealVisXL_V4.0_Lightning", "version": "9.9.9", "mode": "tiny"}
    with httpx.Client(base_url=url, timeout=PROCESS_S) as http:
        assert wait_ready(http) == "IDLE"
        r = http.post("/text-to-image", json={"prompt": "a cat", "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    assert decode_png_url(r.json()["images"][0]["url"]).size == (64, 64)
    log.seek(0)
    text = log.read()
    for flag in ("SFAST=true", "BFLOAT16=true", "MAX_NUM_SEQS=64"):
        assert f"optimisation flag {flag} accepted but not implemented" in text
    assert "tiny mode" in text


# The grace a request in flight gets is the machine's to use: long enough for any.
@pytest.mark.parametrize("runner_process", [{"SHUTDOWN_GRACE_SECONDS": str(int(PROCESS_S))}],
                         indirect=True)
def test_sigterm_lets_the_request_in_flight_finish(runner_process):
    """SIGTERM while a slow request runs: the request still gets its image, the process exits 0
    (and the fixture checks the unload)."""
    import signal
    import threading

    url, log = runner_process
    first_answer(url, time.monotonic() + PROCESS_S)
    with httpx.Client(base_url=url, timeout=PROCESS_S) as http:
        assert wait_ready(http) == "IDLE"
        result = {}
        slow = threading.Thread(target=lambda: result.setdefault("r", http.post(
            "/text-to-image", json={"prompt": "a cat", "width": 256, "height": 256,
                                    "num_inference_steps": 12})))
        slow.start()
        busy = 'runner_queue_depth{model="text-to-image:SG161222/RealVisXL_V4.0_Lightning"} 1.0'
        wait_until(lambda: busy in http.get("/metrics/").text, "the slow request to start",
                   PROCESS_S)
        stopping = time.monotonic()
        runner_process.proc.send_signal(signal.SIGTERM)
        slow.join(PROCESS_S)
    assert result["r"].status_code == 200, result["r"].text
    assert runner_process.proc.wait(PROCESS_S) == 0
    print(f"SIGTERM to exit, a request in flight: {time.monotonic() - stopping:.1f} s")


@pytest.mark.parametrize("runner_process", [
    {"PIPELINE": "image-to-image,image-to-video,upscale", "TINY": "1"}], indirect=True)
def test_several_pipelines_in_one_process(runner_process):
    url, _ = runner_process
    first_answer(url, time.monotonic() + PROCESS_S)
    image = {"image": ("in.png", png_bytes(64, 64), "image/png")}
    with httpx.Client(base_url=url, timeout=PROCESS_S) as http:
        assert wait_ready(http) == "IDLE"
        warm = {m["id"] for m in http.get("/models").json()["models"]}
        assert {"timbrooks/instruct-pix2pix", "stabilityai/stable-video-diffusion-img2vid-xt",
                "stabilityai/stable-diffusion-x4-upscaler"} <= warm
        r = http.post("/image-to-image", files=image,
                      data={"prompt": "snow", "num_inference_steps": "2"})
        assert r.status_code == 200, r.text
        r = http.post("/image-to-video", files=image, data={
            "width": "64", "height": "64", "num_inference_steps": "1", "output_format": "mp4"})
        assert r.status_code == 200, r.text
        assert r.json()["frames"][0][0]["url"].startswith("data:video/mp4;base64,")
        r = http.post("/upscale", files={"image": ("in.png", png_bytes(16, 16), "image/png")},
                      data={"prompt": "a cat", "num_inference_steps": "2"})
        assert r.status_code == 200, r.text
        assert decode_png_url(r.json()["images"][0]["url"]).size == (64, 64)
        assert http.post("/text-to-image", json={"prompt": "x"}).status_code == 404


@pytest.mark.parametrize("runner_process", [
    {"PIPELINE": "audio-to-text,image-to-text,segment-anything-2", "TINY": "1"}], indirect=True)
def test_speech_and_vision_pipelines_in_one_process(runner_process):
    import io

    import av
    import numpy as np

    url, _ = runner_process
    first_answer(url, time.monotonic() + PROCESS_S)
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000, layout="mono")
        samples = (np.sin(np.arange(16_000) / 5) * 8_000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16_000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    image = {"image": ("in.png", png_bytes(48, 32), "image/png")}
    with httpx.Client(base_url=url, timeout=PROCESS_S) as http:
        assert wait_ready(http) == "IDLE"
        r = http.post("/audio-to-text", files={"audio": ("a.wav", buf.getvalue(), "audio/wav")})
        assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text
        r = http.post("/image-to-text", files=image)
        assert r.status_code == 200 and isinstance(r.json()["text"], str), r.text
        r = http.post("/segment-anything-2", files=image,
                      data={"point_coords": "[[10,10]]", "point_labels": "[1]"})
        assert r.status_code == 200 and set(r.json()) == {"masks", "scores", "logits"}, r.text


@pytest.mark.parametrize("runner_process", [{"PIPELINE": "llm", "TINY": "1"}], indirect=True)
def test_llm_serves_chat_on_cpu(runner_process):
    url, _ = runner_process
    first_answer(url, time.monotonic() + PROCESS_S)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    with httpx.Client(base_url=url, timeout=PROCESS_S) as http:
        assert wait_ready(http) == "IDLE"
        r = http.post("/llm", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        r = http.post("/llm", json={**body, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        r = http.post("/v1/chat/completions", json={"model": "", **body})
        assert r.json()["object"] == "chat.completion"
