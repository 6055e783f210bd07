"""Busy is not an error (issue 24): every busy answer is counted in runner_rejected_total,
each model's are logged at WARNING at most once per BUSY_LOG_SECONDS, and none at ERROR."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client import REGISTRY

from runner.app import create_app
from runner.errors import BUSY
from tests.conftest import echo_modules, echo_settings, png_bytes, wait_ready
from tests.support.helpers import hook_replaced

PNG = ("a.png", png_bytes(), "image/png")
FLOOD = 32  # concurrent requests while the model's only place is taken
LANE = "test/echo-small"  # the echo pipeline's default model: labels name models by id


def rejected(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("runner_rejected_total",
                                     {"model": model, "reason": reason}) or 0.0


def busy_lines(caplog, model: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "runner.backpressure" and r.getMessage().startswith(f"{model}: ")]


def errors_logged(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_flood_of_busy_answers_is_counted_and_logged_once(live_server, make_settings,
                                                            caplog):
    """MAX_QUEUE=0 and one request holding the model: each of the flood is refused at once
    (queue full). Every refusal is counted, the log gets one WARNING for the model (the
    interval is far longer than the flood) and no ERROR."""
    caplog.set_level(logging.WARNING)
    app = create_app(echo_settings(make_settings, max_queue=0, busy_log_seconds=3600),
                     echo_modules())
    server = live_server(app)
    spec = app.state.service.specs["echo-image"]
    entered, release = threading.Event(), threading.Event()
    real_run = spec.run

    def held_run(model, request, ctx):  # holds the model's only place until released
        entered.set()
        release.wait(120)
        return real_run(model, request, ctx)

    def post(_: int) -> httpx.Response:
        with server.client() as http:
            return http.post("/echo-image", files={"image": PNG})

    before = rejected(LANE, "queue_full")
    with server.client() as http, ThreadPoolExecutor(FLOOD + 1) as pool:
        wait_ready(http)
        with hook_replaced(spec, "run", held_run):
            holder = pool.submit(post, 0)
            try:
                assert entered.wait(60), "the first request never started running"
                answers = list(pool.map(post, range(FLOOD)))
            finally:
                release.set()
            assert holder.result().status_code == 200
    for r in answers:  # busy as go-livepeer's client reads it, with Retry-After
        assert r.status_code == 500 and r.json()["detail"]["msg"].startswith(BUSY), r.text
        assert int(r.headers["retry-after"]) >= 1
    assert rejected(LANE, "queue_full") == before + FLOOD
    assert errors_logged(caplog) == []
    (line,) = busy_lines(caplog, LANE)
    assert line.levelno == logging.WARNING
    assert "1 request answered busy (queue_full 1)" in line.getMessage()


def test_a_deadline_passed_while_the_model_loads_is_busy_and_counted(app_client,
                                                                     make_settings, caplog):
    """QUEUE_TIMEOUT shorter than a cold load: the request gives up its place with a busy
    answer, counted as `deadline` and logged at WARNING, not ERROR."""
    caplog.set_level(logging.WARNING)
    client = app_client(echo_settings(make_settings, queue_timeout=0.1, error_statuses="http"),
                        echo_modules())
    before = rejected("test/echo-slow", "deadline")
    r = client.post("/echo-image", files={"image": PNG},  # loads for 1.5 s, cold
                    data={"model_id": "test/echo-slow"})
    assert r.status_code == 503, r.text
    assert "still loading" in r.json()["detail"]["msg"]
    assert int(r.headers["retry-after"]) >= 1
    assert rejected("test/echo-slow", "deadline") == before + 1
    assert errors_logged(caplog) == []
    (line,) = busy_lines(caplog, "test/echo-slow")
    assert line.levelno == logging.WARNING and "(deadline 1)" in line.getMessage()
