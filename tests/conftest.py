"""Shared fixtures: tiny models built once per session, apps in tiny mode, a live server."""

from __future__ import annotations

import os

# Before torch is imported anywhere: one thread is 10-40x faster on the 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import base64
import importlib.util
import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from runner.app import create_app
from runner.settings import Settings
from runner.spec import discover
from tests.support import echo_pipeline
from tests.support.helpers import free_port, patient

SUPPORT = Path(__file__).parent / "support"
ECHO_MODELS = SUPPORT / "echo_models.yaml"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One tiny-model folder for the whole session: each checkpoint is written once."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def make_settings(tiny_dir) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        values = dict(pipeline="text-to-image", tiny=True, tiny_dir=tiny_dir, device="cpu")
        values.update(overrides)
        return Settings(**values)

    return make


def echo_modules() -> dict:
    return {**discover(), echo_pipeline.NAME: echo_pipeline}


def echo_settings(make_settings, **overrides) -> Settings:
    values = dict(pipeline="echo-image", models_file=ECHO_MODELS)
    values.update(overrides)
    return make_settings(**values)


# The slowest start a test waits for: tests/api/test_torch_compile.py's TORCH_COMPILE warm-up,
# CPU-bound on one core (82 s on an earlier machine, 210 s on today's at load 2: 203 s of CPU).
SLOWEST_START_S = 210


def wait_ready(client, timeout: float = patient(SLOWEST_START_S)) -> str:
    """The health once start-up is over: LOADING while the warm models load, then OK while
    their TORCH_COMPILE warm-ups run (nothing else is in flight when a test calls this), then
    IDLE, or ERROR. The limit only ends a hang: it is many times the slowest quiet start, so a
    busy machine cannot fail a test here."""
    deadline = time.monotonic() + timeout
    while (status := client.get("/health").json()["status"]) in ("LOADING", "OK"):
        assert time.monotonic() < deadline, "warm-up did not finish"
        time.sleep(0.05)
    return status


@pytest.fixture
def app_client() -> Iterator[Callable[..., TestClient]]:
    """Factory: a started TestClient for given settings/modules, ready (health not LOADING)."""
    stack: list[TestClient] = []

    def start(settings: Settings, modules: dict | None = None, ready: bool = True) -> TestClient:
        client = TestClient(create_app(settings, modules), raise_server_exceptions=False)
        client.__enter__()
        stack.append(client)
        if ready:
            wait_ready(client)
        return client

    yield start
    for client in reversed(stack):
        client.__exit__(None, None, None)


@contextmanager
def serving(pipeline: str, tiny_dir: Path, modules: dict | None = None,
            **settings) -> Iterator[TestClient]:
    """A started, ready TestClient for `pipeline` in tiny mode."""
    settings = Settings(pipeline=pipeline, tiny=True, device="cpu", tiny_dir=tiny_dir,
                        **settings)
    with TestClient(create_app(settings, modules), raise_server_exceptions=False) as client:
        assert wait_ready(client) == "IDLE"
        yield client


@pytest.fixture(scope="session")
def flagging_dir(tmp_path_factory) -> Path:
    """A tiny-model folder whose safety checker flags every image."""
    from runner import safety
    from runner.registry import ModelEntry

    model_dir = tmp_path_factory.mktemp("tiny-flagging")
    entry = ModelEntry(id="CompVis/stable-diffusion-safety-checker", kind="clip-safety-checker")
    safety.build_tiny(entry, model_dir, flag_everything=True)
    return model_dir


@pytest.fixture(scope="module")
def t2i(tmp_path_factory) -> Iterator[TestClient]:
    """A text-to-image app in tiny mode, shared by a test module."""
    with serving("text-to-image", tmp_path_factory.getbasetemp() / "tiny-models-t2i") as c:
        yield c


@pytest.fixture(scope="module")
def echo(tmp_path_factory) -> Iterator[TestClient]:
    """The echo test pipeline in tiny mode, shared by a test module."""
    with serving("echo-image", tmp_path_factory.getbasetemp() / "tiny-models-echo",
                 echo_modules(), models_file=ECHO_MODELS) as c:
        yield c


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, timeout: float = 60, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kwargs)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(app) -> LiveServer:
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def png_bytes(width: int = 32, height: int = 24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def pixels(media: dict):
    """A Media's PNG as an int16 RGB array, for comparing outputs."""
    import numpy as np

    return np.asarray(decode_png_url(media["url"]).convert("RGB"), dtype=np.int16)


def post_image(client, path: str, image: bytes, **fields):
    """A multipart request as go-livepeer writes it: one file part `image`, every other value
    a string; fields given as None are left out."""
    data = {k: str(v) for k, v in fields.items() if v is not None}
    return client.post(path, data=data, files={"image": ("in.png", image, "image/png")})


def decode_png_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


# text-to-speech runs in its own environment (.venv-tts); elsewhere its tests are not collected.
collect_ignore_glob = [] if importlib.util.find_spec("parler_tts") else ["tts/*"]
