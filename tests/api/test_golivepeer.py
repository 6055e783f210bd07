"""The runner driven through a double of go-livepeer (tests/support/golivepeer.py): a warm
container reaches the pool, a flood is answered only with statuses the Go client decodes, the
LLM stream never sends a chunk go-livepeer cannot relay, a runner that could never serve exits
once before binding, and /version passes a gateway's minimum, for every pipeline and model of a
runner that serves several. Every answer must be one the
orchestrator survives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from runner import CONTRACT_VERSION, __version__, wire_version
from runner.app import create_app
from runner.settings import Settings
from tests.conftest import echo_modules, echo_settings, png_bytes, wait_ready
from tests.support import echo_pipeline, golivepeer
from tests.support.contract import contract
from tests.support.echo_pipeline import Hold, held
from tests.support.golivepeer import ContainerWatch, Health
from tests.support.helpers import HANG_S, free_port, patient, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG = ("a.png", png_bytes(), "image/png")
T2I = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2}


def health(http: httpx.Client) -> Health:
    try:
        return Health.of(http.get("/health"))
    except httpx.TransportError as exc:
        return Health(code=0, error=repr(exc))


def first_check(http: httpx.Client, watch: ContainerWatch) -> None:
    """go-livepeer's first health check, polling faster than its 0.5 s."""
    started = time.monotonic()
    while (ready := watch.first_check(time.monotonic() - started, health(http))) is None:
        time.sleep(0.05)
    assert ready, watch.events


def watch_until(http: httpx.Client, watch: ContainerWatch, done, timeout: float = HANG_S) -> None:
    """watchContainer's ticks, faster than its 5 s, until `done(watch)`."""
    started = time.monotonic()
    while not done(watch):
        assert time.monotonic() - started < timeout, watch.events
        watch.tick(time.monotonic() - started, health(http))
        assert not watch.destroyed, watch.events
        time.sleep(0.05)


# -- the container watch -----------------------------------------------------------------------

def test_a_warm_container_enters_the_pool_once_loaded_and_stays_out_while_busy(live_server,
                                                                               make_settings):
    """Borrowed at its first LOADING, handed back at IDLE; a job makes it OK (go-livepeer
    leaves it where it is), and it is IDLE again when the job is done. The load and the job
    are held until the test has seen what it needs."""
    server = live_server(create_app(echo_settings(make_settings, model_id="test/echo-slow"),
                                    echo_modules()))
    watch = ContainerWatch(warm=True)
    with server.client() as http:
        with held(Hold.LOAD):
            first_check(http, watch)
        assert watch.events == ["first check: LOADING"] and watch.borrowed
        watch_until(http, watch, lambda w: w.serves)
        seen = []
        job = threading.Thread(target=lambda: http.post(
            "/echo-image", files={"image": PNG}, data={"hold": "true"}))
        with held():
            job.start()
            wait_until(lambda: seen.append(health(http).status) or seen[-1] == "OK",
                       "health to say OK while the job runs", step=0.05)
        job.join(HANG_S)
        assert not job.is_alive() and set(seen) <= {"OK", "IDLE"}, seen
        assert health(http).status == "IDLE"


def test_the_double_holds_go_livepeers_rules():
    """OK never hands a borrowed container back; LOADING past 3 minutes and ERROR are
    failures, and two destroy it (a warm one is re-created once)."""
    watch = ContainerWatch(warm=True)
    assert watch.first_check(0.0, Health(status="LOADING"))
    for at in range(5, 60, 5):
        watch.tick(at, Health(status="OK"))
    assert watch.borrowed and not watch.serves  # what a runner saying OK when ready met
    loading = ContainerWatch(warm=True)
    loading.first_check(0.0, Health(status="LOADING"))
    for at in range(5, 185, 5):
        loading.tick(at, Health(status="LOADING"))
    assert not loading.destroyed
    loading.tick(185, Health(status="LOADING"))
    loading.tick(190, Health(status="LOADING"))
    assert loading.destroyed and loading.recreated == 1
    error = ContainerWatch(warm=True)
    error.first_check(0.0, Health(status="IDLE"))
    error.tick(5, Health(status="ERROR"))
    assert error.destroyed
    assert ContainerWatch(warm=False).first_check(0.0, Health(status="ERROR")) is False


# -- statuses the client decodes -----------------------------------------------------------

@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny-models-t2i"


def test_a_flood_gets_only_answers_go_livepeer_decodes(live_server, make_settings, t2i_dir):
    """24 clients at once against one model with a queue of 1: results, and busy as the 500
    "insufficient capacity" with Retry-After; /health answers every poll meanwhile."""
    settings = make_settings(tiny_dir=t2i_dir, max_queue=1)
    server = live_server(create_app(settings))
    with server.client(timeout=120) as http:
        wait_ready(http)
        polls: list[str] = []
        stop = threading.Event()

        def poll() -> None:
            with server.client(timeout=HANG_S) as own:  # answered, however slowly
                while not stop.is_set():
                    polls.append(health(own).status)
                    time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: http.post("/text-to-image", json=T2I), range(24)))
        stop.set()
        poller.join()
    counts = Counter(r.status_code for r in answers)
    print(f"flood of 24 on a queue of 1: {dict(counts)}; health polls: {Counter(polls)}")
    for r in answers:
        golivepeer.survives("/text-to-image", r)
        if r.status_code == 500:
            assert r.json()["detail"]["msg"].startswith("insufficient capacity: ")
            assert int(r.headers["retry-after"]) >= 1
    assert set(counts) == {200, 500}, counts
    assert polls and set(polls) <= {"OK", "IDLE"}, Counter(polls)


def test_no_route_documents_a_status_its_client_cannot_decode():
    """The spec the runner serves lists per route only what go-livepeer's client decodes."""
    spec = create_app(Settings(pipeline="all", tiny=True, device="cpu")).openapi()
    for path, route in contract()["paths"].items():
        if "post" in route and path in spec["paths"]:
            ours = {int(s) for s in spec["paths"][path]["post"]["responses"]}
            assert ours <= golivepeer.decoded(path), (path, ours)


@pytest.mark.parametrize("mode, expected", [("go-livepeer", 400), ("http", 413)])
def test_an_oversize_upload_is_a_status_the_route_decodes(app_client, make_settings, mode,
                                                          expected, tmp_path_factory):
    """image-to-image's client has no 413 (a 400 then); image-to-text's has one."""
    settings = make_settings(pipeline="image-to-image,image-to-text",
                             max_upload_bytes=32 * 1024, error_statuses=mode,
                             tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-i2i-i2t")
    client = app_client(settings)
    big = {"image": ("big.png", b"\0" * (64 * 1024), "image/png")}
    r = client.post("/image-to-image", data={"prompt": "x"}, files=big)
    assert r.status_code == expected and "limit" in r.json()["detail"]["msg"], r.text
    if mode == "go-livepeer":
        golivepeer.survives("/image-to-image", r)
    r = client.post("/image-to-text", files=big)
    assert r.status_code == 413, r.text


def test_health_version_and_hardware_answer_with_a_trailing_slash(t2i):
    for path in ("/health", "/version", "/hardware/info", "/hardware/stats"):
        plain, slash = t2i.get(path), t2i.get(f"{path}/")
        assert slash.status_code == 200 and slash.json().keys() == plain.json().keys(), path


# -- the LLM stream --------------------------------------------------------------------------

def test_llm_streams_carry_no_ping_comments_and_v1_keeps_them(tmp_path_factory, monkeypatch):
    """go-livepeer logs every line that is not `data: ...` as a decode error, so /llm sends
    no `: ping`; the OpenAI route keeps its keep-alive (here every 10 ms, to see one)."""
    from runner import openai

    monkeypatch.setattr(openai, "PING_SECONDS", 0.01)
    from sse_starlette import EventSourceResponse

    monkeypatch.setattr(EventSourceResponse, "DEFAULT_PING_INTERVAL", 0.01)
    from tests.conftest import serving

    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 48, "stream": True}
    with serving("llm", tmp_path_factory.getbasetemp() / "tiny-models-llm") as client:
        r = client.post("/llm", json=body)
        read = golivepeer.read_llm_stream(r.text)
        assert not read.decode_errors and ": ping" not in r.text
        assert read.relayed == read.chunks
        assert read.chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        r = client.post("/v1/chat/completions", json=body)
        assert ": ping" in r.text


# -- start-up ---------------------------------------------------------------------------------


def test_a_missing_default_model_exits_once_before_binding_with_the_download_command(tmp_path):
    port = free_port()
    env = {**os.environ, "PIPELINE": "text-to-image", "DEVICE": "cpu", "TINY": "0",
           "MODEL_DIR": str(tmp_path), "HOST": "127.0.0.1", "PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "runner"], env=env, capture_output=True,
                          text=True, timeout=patient(15), cwd=REPO_ROOT)
    assert proc.returncode == 78, proc.stderr[-2000:]
    command = (f"python scripts/download_models.py --model SG161222/RealVisXL_V4.0_Lightning "
               f"--model CompVis/stable-diffusion-safety-checker --model-dir {tmp_path}")
    assert command in proc.stderr, proc.stderr[-2000:]
    assert f"model files for SG161222/RealVisXL_V4.0_Lightning are not in {tmp_path}" \
        in proc.stderr
    assert "Uvicorn running" not in proc.stderr and "Started server" not in proc.stderr


def copy_tiny(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".build.lock"))
    return dest


def real_mode(model_dir: Path, **overrides) -> Settings:
    """A runner reading `model_dir` as its real MODEL_DIR (not tiny mode), on the CPU."""
    return Settings(pipeline="text-to-image", tiny=False, device="cpu", model_dir=model_dir,
                    **overrides)


def unet_file(model_dir: Path) -> Path:
    (path,) = model_dir.glob("models--SG161222--RealVisXL_V4.0_Lightning/snapshots/*/unet/"
                             "*.safetensors")
    return path


def test_whole_files_pass_and_broken_ones_are_named(t2i, t2i_dir, tmp_path):
    """An interrupted download: a truncated safetensors, a config cut short, a snapshot
    folder left empty. Each is named before the port is bound."""
    model_dir = copy_tiny(t2i_dir, tmp_path / "models")
    service = create_app(real_mode(model_dir)).state.service
    assert service.file_problems() == {}
    unet = unet_file(model_dir)
    unet.write_bytes(unet.read_bytes()[:-100])
    (config,) = unet.parent.glob("config.json")
    config.write_text(config.read_text()[:20])
    problems = service.file_problems()
    [(model, found)] = problems.items()
    assert model == "SG161222/RealVisXL_V4.0_Lightning"
    assert any("unet/" in p and p.endswith("its header describes "
                                           f"{unet.stat().st_size + 100}") for p in found), found
    assert any("unet/config.json: not valid JSON" in p for p in found), found
    for path in list(unet.parent.parent.iterdir()):  # the snapshot folder, left empty
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    found = service.file_problems()[model]
    assert any("no weights in the snapshot" in p for p in found), found


# -- version, billing, the operator's config ----------------------------------------------------

def test_version_passes_a_gateways_minimum_at_the_contract_version(t2i):
    reported = t2i.get("/version").json()["version"]
    assert reported == wire_version() == f"{CONTRACT_VERSION}+runner.{__version__}"
    assert golivepeer.compatible(CONTRACT_VERSION, reported)
    assert golivepeer.compatible("0.14.0", reported)
    assert not golivepeer.compatible("0.14.2", reported)
    assert not golivepeer.compatible("0.14.1", "0.1.0")  # what it reported before


TWIN = "echo-twin"


def twin_module() -> types.ModuleType:
    """The echo test pipeline again, under another route and models.yaml key."""
    twin = types.ModuleType("tests.api.golivepeer_twin", echo_pipeline.__doc__)
    twin.__dict__.update({k: v for k, v in vars(echo_pipeline).items()
                          if not k.startswith("__")})
    twin.NAME = TWIN
    return twin


def two_pipelines(folder: Path) -> Path:
    """echo-image with two models (echo-a the default), echo-twin with one. Their 4 kB
    checkpoints go to a tiny folder of their own: the session's holds echo_models.yaml's
    400 kB echo-a and echo-b, whose sizes the eviction tests count on."""
    def echo(model_id: str) -> dict:
        return {"id": model_id, "kind": "echo", "options": {"bytes": 4096}}

    spec = {"safety_checker": {"id": "CompVis/stable-diffusion-safety-checker",
                               "kind": "clip-safety-checker"},
            "pipelines": {
                echo_pipeline.NAME: {"default": "test/echo-a",
                                     "models": [echo("test/echo-a"), echo("test/echo-b")]},
                TWIN: {"default": "test/twin", "models": [echo("test/twin")]}}}
    (folder / "models.yaml").write_text(yaml.safe_dump(spec))
    return folder / "models.yaml"


def test_every_pipeline_and_model_of_a_multi_pipeline_runner_advertises_its_version(
        live_server, make_settings, tmp_path):
    """aiModels lists the runner once per pipeline and model, each at its own base URL: the
    version go-livepeer advertises for each is the runner's, and each URL serves its jobs.
    Listed at the root, as before, the comma-joined names match no entry."""
    settings = make_settings(pipeline=f"{echo_pipeline.NAME},{TWIN}",
                             models_file=two_pipelines(tmp_path),
                             tiny_dir=tmp_path / "tiny")
    server = live_server(create_app(settings, {echo_pipeline.NAME: echo_pipeline,
                                               TWIN: twin_module()}))
    base = server.url
    entries = [
        {"pipeline": echo_pipeline.NAME, "model_id": "test/echo-a",
         "url": f"{base}/pipelines/{echo_pipeline.NAME}"},
        {"pipeline": echo_pipeline.NAME, "model_id": "test/echo-b",
         "url": f"{base}/pipelines/{echo_pipeline.NAME}/test/echo-b"},
        {"pipeline": TWIN, "model_id": "test/twin", "url": f"{base}/pipelines/{TWIN}/"},
    ]
    with server.client() as own:
        assert wait_ready(own) == "IDLE"
    with httpx.Client(timeout=60) as http:
        advertised = golivepeer.advertised_versions(entries, http.get)
        assert advertised == {(e["pipeline"], e["model_id"]): wire_version() for e in entries}
        at_root = [{**entry, "url": base} for entry in entries]
        assert set(golivepeer.advertised_versions(at_root, http.get).values()) == {""}
        root = http.get(f"{base}/version").json()
        assert (root["pipeline"], root["model_id"]) == (f"{echo_pipeline.NAME},{TWIN}",
                                                        "test/echo-a,test/twin")
        for entry in entries:
            route = f"/{entry['pipeline']}"
            r = http.post(golivepeer.client_url(entry["url"], route), files={"image": PNG},
                          data={"model_id": entry["model_id"]})
            assert golivepeer.survives(route, r).kind == "result"
            assert r.json()["model"] == entry["model_id"]
            info = http.get(golivepeer.client_url(entry["url"], "/hardware/info")).json()
            assert (info["pipeline"], info["model_id"]) == (entry["pipeline"],
                                                            entry["model_id"])


def test_a_mistyped_pipeline_url_fails_go_livepeers_first_health_check(live_server,
                                                                       make_settings, tmp_path):
    settings = make_settings(pipeline=f"{echo_pipeline.NAME},{TWIN}",
                             models_file=two_pipelines(tmp_path),
                             tiny_dir=tmp_path / "tiny")
    server = live_server(create_app(settings, {echo_pipeline.NAME: echo_pipeline,
                                               TWIN: twin_module()}))
    typo = {"pipeline": TWIN, "model_id": "test/twin", "url": f"{server.url}/pipelines/echo-twn"}
    with httpx.Client(timeout=60) as http:
        with pytest.raises(golivepeer.ConfigError, match="status code 404"):
            golivepeer.advertised_versions([typo], http.get)
        msg = http.get(f"{typo['url']}/health").json()["detail"]["msg"]
    assert f"/pipelines/{echo_pipeline.NAME}, /pipelines/{TWIN}" in msg, msg


def test_a_single_pipeline_runner_keeps_its_root_version(echo):
    """What go-livepeer's own containers (one per pipeline, MODEL_ID set) and every existing
    `url` entry read: the root /version names the pipeline and its default model."""
    version = echo.get("/version").json()
    assert (version["pipeline"], version["model_id"]) == (echo_pipeline.NAME, "test/echo-small")
    entry = {"pipeline": echo_pipeline.NAME, "model_id": "test/echo-small",
             "url": str(echo.base_url)}
    assert golivepeer.advertised_versions([entry], echo.get) == {
        (echo_pipeline.NAME, "test/echo-small"): wire_version()}


def test_lowest_version_matches_pipeline_and_model_exactly():
    versions = [golivepeer.Version("a,b", "m,n", "0.14.1"), golivepeer.Version("a", "m", "0.15.0"),
                golivepeer.Version("a", "m", "0.14.2-rc1"), golivepeer.Version("a", "m", "x")]
    assert golivepeer.lowest_version(versions, "a", "m") == "0.14.2-rc1"
    assert golivepeer.lowest_version(versions, "b", "n") == ""
    assert golivepeer.client_url("http://h:8000/pipelines/a", "/version") == \
        "http://h:8000/pipelines/a/version"
    assert golivepeer.client_url("http://h:8000", "/a") == "http://h:8000/a"


def test_an_unsized_text_to_image_renders_what_go_livepeer_bills(t2i, app_client,
                                                                 make_settings, t2i_dir):
    from tests.conftest import decode_png_url

    r = t2i.post("/text-to-image", json={"prompt": "a cat", "num_inference_steps": 1})
    assert r.status_code == 200, r.text
    width, height = decode_png_url(r.json()["images"][0]["url"]).size
    assert width * height == golivepeer.billed_pixels({"prompt": "a cat"}) == 512 * 512
    own = app_client(make_settings(tiny_dir=t2i_dir, billed_defaults=False), ready=False)
    entry = own.app.state.service.registry.default("text-to-image")
    assert (entry.defaults["width"], entry.defaults["height"]) == (1024, 1024)


def test_the_docs_examples_pass_go_livepeers_parser():
    examples = sorted((REPO_ROOT / "docs" / "examples").glob("aiModels*.json"))
    assert examples
    for path in examples:
        entries = golivepeer.parse_ai_models(path.read_text())
        assert all("price_per_unit" in e for e in entries), path
    with pytest.raises(golivepeer.ConfigError):  # what deploy.md once said to write
        golivepeer.parse_ai_models(json.dumps([{"pipeline": "llm",
                                                "price_per_unit": "0.0000000012USD"}]))


@pytest.mark.parametrize("damage", ["truncated", "empty snapshot", "missing revision"])
def test_a_broken_model_requested_by_id_is_a_clear_500_and_the_rest_keeps_serving(
        app_client, t2i, t2i_dir, tmp_path, damage):
    """An interrupted download of a model asked for by `model_id`: the answer names what is
    wrong and the command that fetches it again (a 500 go-livepeer decodes, no traceback), and
    the default model still answers."""
    from pipelines import text_to_image

    model_dir = copy_tiny(t2i_dir, tmp_path / "models")
    turbo = "stabilityai/sd-turbo"
    registry = create_app(real_mode(model_dir)).state.service.registry
    text_to_image.build_tiny(registry.resolve("text-to-image", turbo), model_dir)
    repo = model_dir / "models--stabilityai--sd-turbo"
    (snapshot,) = (repo / "snapshots").iterdir()
    if damage == "truncated":
        (unet,) = snapshot.glob("unet/*.safetensors")
        unet.write_bytes(unet.read_bytes()[:-64])
        expected = "unet/diffusion_pytorch_model.safetensors: truncated"
    elif damage == "empty snapshot":
        for path in list(snapshot.iterdir()):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        expected = "no weights in the snapshot"
    else:
        (repo / "refs" / "main").write_text("f" * 40)
        expected = "refs/main names revision ffffffffffff, which has no snapshot folder"
    client = app_client(real_mode(model_dir))
    r = client.post("/text-to-image", json={**T2I, "model_id": turbo})
    assert golivepeer.survives("/text-to-image", r).kind == "error"
    msg = r.json()["detail"]["msg"]
    assert r.status_code == 500 and expected in msg, msg
    assert f"python scripts/download_models.py --model {turbo} --model-dir {model_dir}" in msg
    assert "Traceback" not in r.text
    assert client.post("/text-to-image", json=T2I).status_code == 200
