"""Bind first, load in the background, never block the event loop, refuse rather than pile up,
evict idle models under a small budget."""

import threading
import time

import pytest

from runner.app import create_app
from tests.conftest import echo_modules, echo_settings, png_bytes, wait_ready
from tests.support import echo_pipeline
from tests.support.echo_pipeline import Hold, held
from tests.support.helpers import HANG_S, hook_replaced, wait_until

PNG = ("a.png", png_bytes(), "image/png")


def test_health_is_loading_then_ok(live_server, make_settings):
    app = create_app(echo_settings(make_settings, model_id="test/echo-slow"), echo_modules())
    with held(Hold.LOAD):  # the default model loads after the port binds, until the block ends
        server = live_server(app)
        with server.client() as http:
            assert http.get("/health").json() == {"status": "LOADING"}
            assert http.get("/version").json()["model_id"] == "test/echo-slow"
    with server.client() as http:
        assert wait_ready(http) == "IDLE"
        r = http.post("/echo-image", files={"image": PNG})
        assert r.json()["model"] == "test/echo-slow"


def test_health_is_error_when_the_warm_model_fails_and_others_still_serve(app_client,
                                                                          make_settings):
    client = app_client(echo_settings(make_settings, model_id="test/echo-broken"),
                        echo_modules())
    assert client.get("/health").json() == {"status": "ERROR"}
    r = client.post("/echo-image", files={"image": PNG}, data={"model_id": "test/echo-a"})
    assert r.status_code == 200 and r.json()["model"] == "test/echo-a"
    r = client.post("/echo-image", files={"image": PNG})
    assert r.status_code == 500 and "could not" not in r.text


def in_flight(http) -> bool:
    return any(m["in_flight"] for m in http.get("/models").json()["models"])


def test_health_answers_while_a_long_inference_runs(live_server, make_settings):
    """The run is held (blocking its worker thread) until every health poll is answered: a
    /health that waited for it would never answer."""
    server = live_server(create_app(echo_settings(make_settings), echo_modules()))
    done = threading.Event()
    result = {}

    def long_request():
        with server.client() as http:
            result["r"] = http.post("/echo-image", files={"image": PNG}, data={"hold": "true"})
        done.set()

    with server.client() as http:
        wait_ready(http)
        worker = threading.Thread(target=long_request)
        with held():
            worker.start()
            wait_until(lambda: in_flight(http), "the long request to hold its model")
            latencies = []
            for _ in range(20):
                started = time.perf_counter()
                assert http.get("/health").json() == {"status": "OK"}
                latencies.append(time.perf_counter() - started)
                assert not done.is_set(), "health should answer while the inference still runs"
                time.sleep(0.05)
    worker.join(HANG_S)
    assert result["r"].status_code == 200
    print(f"health latency during inference: max {max(latencies) * 1000:.1f} ms")


@pytest.mark.parametrize("mode, status, prefix", [("go-livepeer", 500, "insufficient capacity"),
                                                  ("http", 503, "")])
def test_full_queue_is_busy_with_retry_after(live_server, make_settings, mode, status, prefix):
    """Busy as the caller can read it: go-livepeer's client decodes no 503, so by default it is
    a 500 that says what go-livepeer itself says when it has no capacity."""
    server = live_server(create_app(echo_settings(make_settings, max_queue=0,
                                                  error_statuses=mode), echo_modules()))
    first = {}

    def occupy():
        with server.client() as http:
            first["r"] = http.post("/echo-image", files={"image": PNG}, data={"hold": "true"})

    with server.client() as http:
        wait_ready(http)
        worker = threading.Thread(target=occupy)
        with held():  # the first request holds the model's only slot until the block ends
            worker.start()
            wait_until(lambda: in_flight(http), "the first request to hold the model")
            r = http.post("/echo-image", files={"image": PNG})
    worker.join(HANG_S)
    assert r.status_code == status
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["detail"]["msg"].startswith(prefix) and "retry" in r.json()["detail"]["msg"]
    assert first["r"].status_code == 200


def test_idle_model_is_evicted_under_a_small_budget(app_client, make_settings):
    client = app_client(echo_settings(make_settings, vram_budget=1_000_000), echo_modules())

    def resident():
        return {m["id"] for m in client.get("/models").json()["models"] if m["state"] == "ready"}

    def generate(model_id):
        r = client.post("/echo-image", files={"image": PNG}, data={"model_id": model_id})
        assert r.status_code == 200, r.text
        return r.json()

    def evictions() -> float:
        from prometheus_client import REGISTRY

        value = REGISTRY.get_sample_value("runner_model_evictions_total",
                                          {"model": "test/echo-a"})
        return value or 0.0

    before = evictions()
    assert resident() == {"test/echo-small"}
    generate("test/echo-a")
    assert resident() == {"test/echo-small", "test/echo-a"}
    generate("test/echo-b")  # 3 x 400 kB > 1 MB: the idle, unpinned echo-a goes
    assert resident() == {"test/echo-small", "test/echo-b"}
    assert generate("test/echo-a")["size"] == 2  # reloads on demand, its own defaults
    assert resident() == {"test/echo-small", "test/echo-a"}
    assert 'runner_model_evictions_total{model="test/echo-a"}' in client.get("/metrics/").text
    assert evictions() == before + 1


def test_metrics_answer_at_the_path_scrapers_use(echo):
    """GET /metrics is the exposition itself (Prometheus does not follow a redirect to
    /metrics/ unless told to); /metrics/ keeps answering too."""
    assert echo.post("/echo-image", files={"image": PNG}).status_code == 200
    for path in ("/metrics", "/metrics/"):
        r = echo.get(path, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code, r.headers.get("location"))
        assert r.headers["content-type"].startswith("text/plain")
        assert 'runner_requests_total{pipeline="echo-image",status="200"}' in r.text, path
    assert echo.post("/metrics").status_code == 405


def test_a_model_that_can_never_fit_is_422(app_client, make_settings):
    client = app_client(echo_settings(make_settings, vram_budget=1_000_000), echo_modules())
    r = client.post("/echo-image", files={"image": PNG}, data={"model_id": "test/echo-huge"})
    assert r.status_code == 422
    assert "more than this runner can hold" in r.json()["detail"][0]["msg"]
    assert client.post("/echo-image", files={"image": PNG}).status_code == 200


def test_go_multipart_encodings(echo):
    r = echo.post("/echo-image", files={"image": PNG}, data={
        "strength": "0.800000", "flag": "false", "seed": "42", "points": "[[10,20],[30,40]]",
        "model_id": "", "size": "576"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strength"] == 0.8 and body["flag"] is False and body["seed"] == 42
    assert body["points"] == [[10, 20], [30, 40]] and body["size"] == 576
    assert body["model"] == "test/echo-small" and (body["width"], body["height"]) == (32, 24)


def test_models_yaml_defaults_fill_unset_fields(echo):
    assert echo.post("/echo-image", files={"image": PNG}).json()["size"] == 1
    r = echo.post("/echo-image", files={"image": PNG}, data={"size": "9"})
    assert r.json()["size"] == 9


def test_trailing_slash_alias(echo):
    assert echo.post("/echo-image/", files={"image": PNG}).status_code == 200


def test_form_fields_over_one_mebibyte_are_accepted(echo):
    """SAM2's 1x256x256 mask_input is ~1.5 MB as JSON; Starlette's default caps a field at 1 MiB."""
    points = "[" + ",".join(["[0.123456,0.654321]"] * 80_000) + "]"
    assert len(points) > 1 << 20
    r = echo.post("/echo-image", files={"image": PNG}, data={"points": points})
    assert r.status_code == 200, r.text
    assert len(r.json()["points"]) == 80_000


def test_operators_load_pin_and_unload_models(app_client, make_settings):
    client = app_client(echo_settings(make_settings, auth_token="op"), echo_modules())
    auth = {"Authorization": "Bearer op"}

    def states():
        return {m["id"]: (m["state"], m["pinned"])
                for m in client.get("/models").json()["models"]}

    assert client.post("/models/test/echo-a/load").status_code == 401
    r = client.post("/models/test/echo-a/load", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "ready"
    assert states()["test/echo-a"] == ("ready", False)
    r = client.post("/models/test/echo-b/pin?pipeline=echo-image", headers=auth)
    assert r.json()["pinned"] is True
    r = client.post("/models/test/echo-b/unload", headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "cold"
    assert "test/echo-b" not in states()
    r = client.post("/models/nobody/nothing/load", headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model_id"]
    r = client.post("/models/test/echo-a/load?pipeline=text-to-speech", headers=auth)
    assert r.status_code == 422
    metrics = client.get("/metrics/").text
    assert 'runner_estimate_ratio{model="test/echo-a"}' in metrics


def test_a_busy_model_is_not_unloaded(live_server, make_settings):
    server = live_server(create_app(echo_settings(make_settings), echo_modules()))
    done = threading.Event()

    def long_request():
        with server.client() as http:
            http.post("/echo-image", files={"image": PNG}, data={"hold": "true"})
        done.set()

    with server.client() as http:
        wait_ready(http)
        with held():
            threading.Thread(target=long_request).start()
            wait_until(lambda: in_flight(http), "the long request to hold its model")
            r = http.post("/models/test/echo-small/unload")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert done.wait(HANG_S)
        r = http.post("/models/test/echo-small/unload")
        assert r.status_code == 200 and r.json()["state"] == "cold"


def test_metrics_count_requests_and_time_inference(echo):
    echo.post("/echo-image", files={"image": PNG})
    echo.post("/echo-image", files={"image": PNG}, data={"model_id": "nope/nope"})
    text = echo.get("/metrics/").text
    assert 'runner_requests_total{pipeline="echo-image",status="200"}' in text
    assert 'runner_requests_total{pipeline="echo-image",status="422"}' in text
    assert 'runner_inference_seconds_count{model="test/echo-small",pipeline="echo-image"}' in text


def test_a_client_that_goes_away_stops_its_run_and_frees_its_place(live_server, make_settings):
    """go-livepeer's timeout (or a closed app) drops the connection mid-run: the run stops at
    its next step, the model's only slot is free for the next request, and the request is
    counted as cancelled. The run is held until the test ends, so only its client's going can
    stop it."""
    import socket

    import httpx
    from prometheus_client import REGISTRY

    def cancelled() -> float:
        return REGISTRY.get_sample_value("runner_cancelled_total") or 0.0

    before, stopped = cancelled(), len(echo_pipeline.STOPPED)
    server = live_server(create_app(echo_settings(make_settings, max_queue=0), echo_modules()))
    request = httpx.Request("POST", f"{server.url}/echo-image", files={"image": PNG},
                            data={"hold": "true"})
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    raw = f"POST /echo-image HTTP/1.1\r\n{head}\r\n".encode() + request.read()
    with server.client() as http, held():
        wait_ready(http)
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_S) as client:
            client.sendall(raw)
            wait_until(lambda: in_flight(http), "the run to start")
        # The client has gone.
        wait_until(lambda: len(echo_pipeline.STOPPED) > stopped,
                   "the run to see its client go away")
        # With MAX_QUEUE=0 the next request would be a 503 if the stopped run held its slot.
        wait_until(lambda: not in_flight(http), "the stopped run to let go of its model")
        r = http.post("/echo-image", files={"image": PNG})
        assert r.status_code == 200, r.text
    assert cancelled() == before + 1


def test_a_run_retried_after_out_of_memory_reads_its_upload_again(echo):
    """The first attempt read the upload to its end before the OOM; the retry must see it
    whole, not an empty file (a 400)."""
    from tests.support import echo_pipeline

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda.OutOfMemoryError has
        pass

    attempts = []
    real_run = echo_pipeline.run

    def run_oom_once(model, request, ctx):
        attempts.append(len(request.image.file.read()))
        if len(attempts) == 1:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        request.image.file.seek(0)
        return real_run(model, request, ctx)

    with hook_replaced(echo.app.state.service.specs["echo-image"], "run", run_oom_once):
        r = echo.post("/echo-image", files={"image": PNG})
    assert r.status_code == 200, r.text
    assert attempts == [len(PNG[1])] * 2
    assert (r.json()["width"], r.json()["height"]) == (32, 24)


def test_the_byte_gauges_read_the_cache_when_scraped(app_client, make_settings):
    """Budget, resident and running bytes are read from the cache at scrape time, not
    written on every request (from the process's latest cache: one per runner)."""
    import re

    client = app_client(echo_settings(make_settings), echo_modules())
    cache = client.app.state.service.cache
    assert client.post("/echo-image", files={"image": PNG}).status_code == 200
    text = client.get("/metrics/").text

    def gauge(name: str) -> float:
        (value,) = re.findall(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(value)

    assert gauge("runner_budget_bytes") == cache.budget
    assert gauge('runner_resident_bytes{tier="device"}') == cache.resident_bytes > 0
    assert gauge("runner_running_bytes") == cache.running_bytes == 0
