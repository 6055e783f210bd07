"""The runner as a go-livepeer Live Runner (issue 17), against the loopback registry double in
tests/support/live_orchestrator.py: dynamic registration (one per served pipeline, the
orchestrator's secret first and the returned heartbeat secret after, at the returned interval,
again at once after a 404 or 401), what each heartbeat says (loading, then ready; a capacity that
follows the queue; the proxied sessions in hand), the proxy's session headers reaching the
runner, /ready and the withdrawal on drain and on SIGTERM, and the static `live-config`.

The runner is served for real: uvicorn in a thread (two pipelines: the test-only echo-image and
a twin of it under another name), or `python -m runner` in a process where a signal is needed.
Every wait polls with a deadline many times its quiet time; the heartbeat interval is 200 ms, and
the TTL and the runner's request timeout are long enough that a busy machine delaying a heartbeat
changes nothing. Runs in flight and loads are held (echo_pipeline.held) until the test has seen
them, not slept through.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner import live
from runner.app import build_service, create_app
from runner.settings import Settings
from tests.conftest import LiveServer, png_bytes
from tests.support import echo_pipeline
from tests.support.echo_pipeline import Hold, held
from tests.support.helpers import HANG_S, free_port, patient
from tests.support.live_orchestrator import Beat, LiveOrchestrator, static_config_problems

TWIN = "echo-twin"
APPS = (echo_pipeline.NAME, TWIN)
SECRET = "orch-secret-for-tests"
SESSION_HEADERS = ("livepeer-runner-route", "livepeer-session-id", "livepeer-session-token",
                   "livepeer-session-control")


def twin_module() -> types.ModuleType:
    """The echo pipeline again under another name: a second served pipeline that costs
    nothing to load."""
    twin = types.ModuleType("tests.api.echo_twin", echo_pipeline.__doc__)
    for name, value in vars(echo_pipeline).items():
        if not name.startswith("__"):
            setattr(twin, name, value)
    twin.NAME = TWIN
    return twin


MODULES = {echo_pipeline.NAME: echo_pipeline, TWIN: twin_module()}


def models_yaml(folder: Path) -> Path:
    path = folder / "live-models.yaml"
    path.write_text(f"""\
safety_checker: {{id: CompVis/stable-diffusion-safety-checker, kind: clip-safety-checker}}
pipelines:
  echo-image:
    default: test/live-echo
    models:
      - {{id: test/live-echo, kind: echo, options: {{bytes: 4096}}}}
  {TWIN}:
    default: test/live-twin
    models:
      - {{id: test/live-twin, kind: echo, options: {{bytes: 4096}}}}
""")
    return path


class Recorder:
    """ASGI: the app it wraps (set once the runner's own URL is known, since the settings
    name it), recording each HTTP request's path and headers."""

    def __init__(self) -> None:
        self.app: Any = None
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["path"], {k.decode("latin-1"): v.decode("latin-1")
                                              for k, v in scope["headers"]}))
        await self.app(scope, receive, send)


@dataclass
class Served:
    url: str
    app: Any
    recorder: Recorder
    settings: Settings
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def drain(self) -> None:
        """What SIGTERM does first (runner/__main__.py), from this thread."""
        self.app.state.begin_drain()

    def echo(self, path: str = "/echo-image", hold: bool = False,
             client: httpx.Client | None = None) -> httpx.Response:
        return (client or self.http).post(
            path, files={"image": ("in.png", png_bytes(32, 24), "image/png")},
            data={"hold": "true"} if hold else {})


@pytest.fixture
def orchestrator(monkeypatch) -> Iterator[LiveOrchestrator]:
    # A heartbeat the double holds is answered when the test lets it go, however late.
    monkeypatch.setattr(live, "REQUEST_TIMEOUT_S", HANG_S)
    with LiveOrchestrator(secret=SECRET, interval="200ms").serve() as double:
        yield double


@pytest.fixture
def serve(make_settings, tmp_path) -> Iterator[Callable[..., Served]]:
    """Factory: the runner serving echo-image and its twin in a uvicorn thread, registering
    with `double`; stopped (drained, withdrawn) at the end of the test."""
    servers: list[tuple[LiveServer, Served]] = []

    def start(double: LiveOrchestrator, **overrides) -> Served:
        recorder = Recorder()
        server = LiveServer(recorder)
        values = dict(pipeline=",".join(APPS), models_file=models_yaml(tmp_path),
                      live_orch_url=double.url, live_orch_secret=SECRET,
                      live_runner_url=server.url, health_probe_seconds=0)
        values.update(overrides)
        settings = make_settings(**values)
        recorder.app = create_app(settings, MODULES)
        served = Served(server.url, recorder.app, recorder, settings)
        server.__enter__()
        servers.append((server, served))
        return served

    yield start
    for server, served in reversed(servers):
        served.http.close()
        server.__exit__(None, None, None)


def registered(double: LiveOrchestrator, app: str, timeout: float = HANG_S) -> Beat:
    """The first registration of `app` (waiting for it)."""
    return double.wait_for(lambda: next(iter(double.registrations(app)), None),
                           f"{app} to register", timeout)


def beat_where(double: LiveOrchestrator, runner_id: str, check: Callable[[Beat], bool],
               what: str, after: float = 0.0, timeout: float = HANG_S) -> Beat:
    """The first heartbeat of `runner_id` answered after `after` for which `check` holds."""
    return double.wait_for(
        lambda: next((b for b in double.beats_of(runner_id) if b.at > after and check(b)),
                     None), f"a heartbeat of {runner_id} where {what}", timeout)


def ready_beat(double: LiveOrchestrator, runner_id: str, after: float = 0.0) -> Beat:
    return beat_where(double, runner_id, lambda b: b.status == 200
                      and b.body["status"] == "ready", "status is ready", after)


# -- helpers of runner/live.py ----------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("5s", 5.0), ("200ms", 0.2), ("1m30s", 90.0), ("1h0m0s", 3600.0), ("1.5s", 1.5),
    ("250µs", 0.00025), ("250us", 0.00025), ("20s", 20.0), ("0s", 0.0)])
def test_go_duration_reads_what_go_writes(text, seconds):
    assert live.go_duration(text, default=7.0) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "abc", "5 s", "-1s", "5s and more", "1d", "s"])
def test_go_duration_falls_back_on_anything_else(text):
    assert live.go_duration(text, default=7.0) == 7.0


def test_registrar_needs_all_three_settings_or_none(make_settings, tmp_path):
    base = dict(pipeline=",".join(APPS), models_file=models_yaml(tmp_path))
    full = dict(live_orch_url="http://orch:8935", live_orch_secret="s",
                live_runner_url="http://runner:8000")
    service = build_service(make_settings(**base), MODULES)
    assert live.registrar(make_settings(**base), service) is None
    for left_out in full:
        partial = make_settings(**base, **{k: v for k, v in full.items() if k != left_out})
        with pytest.raises(ValueError, match=left_out.upper()):
            live.registrar(partial, service)
        with pytest.raises(ValueError, match=left_out.upper()):
            create_app(partial, MODULES)  # the runner refuses to start half-configured
    registrar = live.registrar(make_settings(**base, **full), service)
    assert registrar is not None
    assert [reg.app for reg in registrar.registrations] == list(APPS)


# -- dynamic registration -----------------------------------------------------------------------

def test_registers_each_pipeline_with_the_orch_secret_then_its_own(orchestrator, serve):
    runner = serve(orchestrator, live_price="0.25", live_price_unit="hour")
    first = {app: registered(orchestrator, app) for app in APPS}
    ids = {app: beat.answer["runner_id"] for app, beat in first.items()}
    assert len(set(ids.values())) == len(APPS)  # one registration per served pipeline
    for runner_id in ids.values():
        ready_beat(orchestrator, runner_id)
        orchestrator.wait_for(lambda r=runner_id: len(orchestrator.beats_of(r)) >= 3,
                              f"three heartbeats of {runner_id}")
    beats, _ = orchestrator.snapshot()
    assert [b for b in beats if b.status != 200] == []  # every heartbeat was well formed
    for app, runner_id in ids.items():
        mine = [b for b in beats if b.app == app]
        # The first carries the registration secret and no runner_id; the answer's secret is
        # the only one sent after, with the runner_id it was given.
        assert mine[0] is first[app] and mine[0].auth == SECRET
        assert "runner_id" not in mine[0].body
        secret = first[app].answer["heartbeat_secret"]
        assert len(mine) >= 3
        for beat in mine[1:]:
            assert (beat.auth, beat.body["runner_id"]) == (secret, runner_id)
            assert "heartbeat_secret" not in beat.answer
        body = mine[-1].body
        assert body["app"] == app and body["mode"] == "single-shot"
        assert body["runner_url"] == runner.url and body["label"] == f"runner-{app}"
        assert body["version"] == runner.settings.version
        assert body["price_info"] == {"price": "0.25", "currency": "usd", "unit": "hour"}
        assert body["status"] == "ready" and body["capacity"] >= 1
        assert [r.id for r in orchestrator.ready(app)] == [runner_id]


def test_heartbeats_come_at_the_interval_the_orchestrator_returns(orchestrator, serve):
    """The interval is 200 ms here, against a default of 5 s before the first answer: each
    registration's heartbeats come an interval apart or more (no busy loop), and most of them
    much less than the default apart (half of it: twelve intervals, whatever the machine)."""
    serve(orchestrator)
    ids = [registered(orchestrator, app).answer["runner_id"] for app in APPS]
    for runner_id in ids:
        beats = orchestrator.wait_for(
            lambda r=runner_id: (found := orchestrator.beats_of(r))[7:] and found,
            f"eight heartbeats of {runner_id}")
        gaps = [b.at - a.at for a, b in zip(beats, beats[1:], strict=False)]
        assert min(gaps) > 0.15, gaps
        assert statistics.median(gaps) < live.DEFAULT_INTERVAL_S / 2, gaps


def test_a_wrong_orch_secret_is_refused_and_logged_and_serving_goes_on(orchestrator, serve,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="runner.live")
    runner = serve(orchestrator, live_orch_secret="not-the-secret")
    orchestrator.wait_for(
        lambda: {b.app for b in orchestrator.snapshot()[0] if b.status == 401} >= set(APPS),
        "both registrations to be refused")
    assert orchestrator.alive() == [] and orchestrator.registrations() == []
    assert all(b.auth == "not-the-secret" for b in orchestrator.snapshot()[0])
    orchestrator.wait_for(lambda: runner.http.get("/ready").status_code == 200, "/ready 200")
    answer = runner.echo()
    assert answer.status_code == 200, answer.text
    assert answer.json()["width"] == 32
    for app in APPS:
        logged = [r for r in caplog.records if r.name == "runner.live"
                  and r.levelno == logging.WARNING and app in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert "refused: 401" in logged[0].getMessage()


def test_a_404_or_401_registers_again_at_once_with_a_new_runner_id(orchestrator, serve):
    serve(orchestrator)
    old = {app: registered(orchestrator, app) for app in APPS}
    gone, rotated = old[echo_pipeline.NAME], old[TWIN]
    orchestrator.forget(gone.answer["runner_id"])  # removed, or expired: 404
    orchestrator.rotate(rotated.answer["runner_id"])  # a secret it no longer knows: 401
    for app, status in ((echo_pipeline.NAME, 404), (TWIN, 401)):
        again = orchestrator.wait_for(lambda app=app: orchestrator.registrations(app)[1:],
                                      f"{app} to register again")[0]
        assert again.answer["runner_id"] != old[app].answer["runner_id"]
        assert again.auth == SECRET and "runner_id" not in again.body
        # The refused heartbeat is followed at once by the registration, with no beat between.
        mine = [b for b in orchestrator.snapshot()[0] if b.app == app]
        at = mine.index(again)
        assert mine[at - 1].status == status
        assert mine[at - 1].body["runner_id"] == old[app].answer["runner_id"]
        ready_beat(orchestrator, again.answer["runner_id"])


def test_loading_then_ready_then_drained(orchestrator, serve):
    """/ready is 503 while the warm model loads (heartbeats say loading, capacity 0), 200 once
    it serves (ready), 503 again from the moment draining begins, when every registration is
    withdrawn with its heartbeat secret and no heartbeat follows."""
    with held(Hold.LOAD):  # the warm models load once the block ends
        runner = serve(orchestrator)
        first = {app: registered(orchestrator, app) for app in APPS}
        early = runner.http.get("/ready")
        assert early.status_code == 503 and early.json() == {"ready": False, "status": "LOADING"}
        loading = first[echo_pipeline.NAME].body
        assert (loading["status"], loading["capacity"]) == ("loading", 0)
        assert orchestrator.ready(echo_pipeline.NAME) == []

    ids = {app: beat.answer["runner_id"] for app, beat in first.items()}
    for runner_id in ids.values():
        assert ready_beat(orchestrator, runner_id).body["capacity"] >= 1
    serving = runner.http.get("/ready")
    assert serving.status_code == 200 and serving.json()["ready"] is True
    assert all(orchestrator.ready(app) for app in APPS)

    runner.drain()
    orchestrator.wait_for(lambda: runner.http.get("/ready").status_code == 503, "/ready 503")
    assert runner.http.get("/ready").json() == {"ready": False, "status": "DRAINING"}
    def unregisters() -> dict:
        found = {u.runner_id: u for u in orchestrator.snapshot()[1]}
        return found if found.keys() >= set(ids.values()) else {}

    withdrawn = orchestrator.wait_for(unregisters, "both unregisters")
    for app, runner_id in ids.items():
        assert withdrawn[runner_id].status == 200
        assert withdrawn[runner_id].auth == first[app].answer["heartbeat_secret"]
    last = max(u.at for u in withdrawn.values())
    quiet = time.monotonic()
    orchestrator.wait_for(lambda: time.monotonic() - quiet > 0.6, "three intervals", 5)
    assert [b for b in orchestrator.snapshot()[0] if b.at > last and b.status == 200] == []
    assert not any(orchestrator.ready(app) for app in APPS)
    assert runner.echo().status_code == 200  # what is in hand or still sent is served


@pytest.mark.parametrize("when", ["registering", "registered"])
def test_draining_while_a_heartbeat_is_in_flight_leaves_nothing_registered(orchestrator, serve,
                                                                           when):
    """A heartbeat the orchestrator answers only after draining began must not leave the
    runner registered: a first registration answered then is withdrawn at once, and a 404 for a
    runner just unregistered is not answered by registering again."""
    if when == "registering":
        with orchestrator.hold():
            runner = serve(orchestrator)
            orchestrator.wait_for(lambda: orchestrator.waiting >= len(APPS), "held beats")
            runner.drain()
        ids = [registered(orchestrator, app).answer["runner_id"] for app in APPS]
    else:
        runner = serve(orchestrator)
        ids = [registered(orchestrator, app).answer["runner_id"] for app in APPS]
        for runner_id in ids:
            ready_beat(orchestrator, runner_id)
        with orchestrator.hold():
            orchestrator.wait_for(lambda: orchestrator.waiting >= len(APPS), "held beats")
            runner.drain()
            orchestrator.wait_for(lambda: len(orchestrator.snapshot()[1]) >= len(APPS),
                                  "the unregisters")
    orchestrator.wait_for(
        lambda: {u.runner_id for u in orchestrator.snapshot()[1] if u.status == 200}
        >= set(ids), "every registration to be withdrawn")
    orchestrator.wait_for(lambda: orchestrator.waiting == 0, "the held beats to be answered")
    quiet = time.monotonic()
    orchestrator.wait_for(lambda: time.monotonic() - quiet > 0.6, "three intervals", 5)
    assert sorted(b.answer["runner_id"] for b in orchestrator.registrations()) == sorted(ids)
    assert not any(orchestrator.ready(app) for app in APPS)
    assert orchestrator.alive() == []


# -- capacity and the proxy ---------------------------------------------------------------------

def test_capacity_follows_the_queue(orchestrator, serve):
    """MAX_QUEUE=1: echo-image's lane takes 2 (one running, one waiting). Two held requests
    fill it: its heartbeats say capacity 0 and busy (go-livepeer would read 0 as 1), it leaves
    discovery and the proxy refuses it; the twin's lane is untouched; then it recovers."""
    runner = serve(orchestrator, max_queue=1)
    ids = {app: registered(orchestrator, app).answer["runner_id"] for app in APPS}
    idle = ready_beat(orchestrator, ids[echo_pipeline.NAME])
    assert idle.body["capacity"] == 2
    results: list[httpx.Response] = []

    def slow_request() -> None:
        with httpx.Client(base_url=runner.url, timeout=HANG_S) as client:
            results.append(runner.echo(hold=True, client=client))

    slow = [threading.Thread(target=slow_request) for _ in range(2)]
    try:
        with held():
            for thread in slow:
                thread.start()
            full = beat_where(orchestrator, ids[echo_pipeline.NAME],
                              lambda b: b.body["capacity"] == 0, "capacity is 0", after=idle.at)
            assert full.body["status"] == "busy"
            assert orchestrator.ready(echo_pipeline.NAME) == []
            refused = httpx.post(
                f"{orchestrator.url}/apps/{ids[echo_pipeline.NAME]}/app/echo-image",
                files={"image": ("in.png", png_bytes(), "image/png")}, timeout=HANG_S)
            assert refused.status_code in (404, 503), refused.text
            twin = beat_where(orchestrator, ids[TWIN], lambda b: True, "it beats", after=full.at)
            assert (twin.body["status"], twin.body["capacity"]) == ("ready", 2)
    finally:
        for thread in slow:
            thread.join(HANG_S)
    assert [r.status_code for r in results] == [200, 200]
    again = beat_where(orchestrator, ids[echo_pipeline.NAME],
                       lambda b: b.body["capacity"] == 2, "capacity is back", after=full.at)
    assert again.body["status"] == "ready"


def test_proxied_requests_reach_the_runner_with_the_session_headers(orchestrator, serve):
    runner = serve(orchestrator, max_queue=1)
    runner_id = registered(orchestrator, echo_pipeline.NAME).answer["runner_id"]
    ready_beat(orchestrator, runner_id)
    app_url = f"{orchestrator.url}/apps/{runner_id}/app/echo-image"
    image = {"image": ("in.png", png_bytes(40, 30), "image/png")}

    answer = httpx.post(app_url, files=image, data={"strength": "0.5"}, timeout=HANG_S)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["width"], answer.json()["height"], answer.json()["strength"]) \
        == (40, 30, 0.5)
    session = orchestrator.sessions[-1]
    assert session.status == 200 and session.closed is not None
    path, headers = [(p, h) for p, h in runner.recorder.seen if "livepeer-session-id" in h][-1]
    assert path == "/echo-image"
    assert {k: headers[k] for k in SESSION_HEADERS} == {
        "livepeer-runner-route": runner_id, "livepeer-session-id": session.id,
        "livepeer-session-token": session.token, "livepeer-session-control": orchestrator.url}

    # While a held proxied request is in hand its session is in the runner's heartbeats, and
    # counted back into the capacity the orchestrator reads (it counts its sessions itself).
    results: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: results.append(httpx.post(
        app_url, files=image, data={"hold": "true"}, timeout=HANG_S)))
    started = time.monotonic()
    try:
        with held():
            slow.start()
            session = orchestrator.wait_for(lambda: [s for s in orchestrator.sessions
                                                     if s.opened > started], "the session")[0]
            during = beat_where(orchestrator, runner_id,
                                lambda b: session.id in b.body.get("session_ids", []),
                                "it lists the proxied session", after=started)
            assert during.body["capacity"] == 2 and during.answer["session_ids"] == [session.id]
    finally:
        slow.join(HANG_S)
    assert results[0].status_code == 200, results[0].text
    after = beat_where(orchestrator, runner_id, lambda b: not b.body.get("session_ids"),
                       "the session is gone", after=session.closed or 0)
    assert after.body["capacity"] == 2 and after.answer["session_ids"] == []


# -- the process --------------------------------------------------------------------------------

def test_sigterm_withdraws_the_registration_before_the_process_exits(tiny_dir, tmp_path):
    """SIGTERM on `python -m runner`: the registration is withdrawn, and the answer read,
    before the process exits 0 on its own, even where the orchestrator takes a second to
    answer the unregister. (That the exit fits go-livepeer's 8 s is the machine's speed: the
    image check times it.)"""
    port = free_port()
    double = LiveOrchestrator(secret=SECRET, interval="200ms", unregister_delay=1.0)
    process_s = patient(15)  # a start, a tiny model's load, a stop: seconds when quiet
    with double.serve(), open(tmp_path / "runner.log", "w+") as log:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_")}
        env.update({"PIPELINE": "text-to-image", "HOST": "127.0.0.1", "PORT": str(port),
                    "TINY": "1", "DEVICE": "cpu", "TINY_DIR": str(tiny_dir), "AUTH_TOKEN": "",
                    "HEALTH_PROBE_SECONDS": "0", "LIVE_ORCH_URL": double.url,
                    "LIVE_ORCH_SECRET": SECRET, "LIVE_RUNNER_URL": f"http://127.0.0.1:{port}"})
        proc = subprocess.Popen([sys.executable, "-m", "runner"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            first = registered(double, "text-to-image", timeout=process_s)
            runner_id = first.answer["runner_id"]
            beat_where(double, runner_id, lambda b: b.body["status"] == "ready",
                       "status is ready", timeout=process_s)
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=process_s)
            exited = time.monotonic()
            # Read at once: the unregister must have reached the orchestrator already.
            withdrawn = [u for u in double.snapshot()[1] if u.runner_id == runner_id]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        log.seek(0)
        text = log.read()
    assert code == 0, text[-3000:]
    print(f"SIGTERM to exit, an unregister answered in 1 s: {exited - stopping:.1f} s")
    assert [(u.status, u.auth) for u in withdrawn] == [(200, first.answer["heartbeat_secret"])]
    assert withdrawn[0].at <= exited
    assert "live runner text-to-image: unregistered (200)" in text


def test_live_config_is_a_static_go_livepeer_config(make_settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_")}
    env.update({"PIPELINE": "text-to-image,upscale", "LIVE_RUNNER_URL": "http://runner:8000/",
                "LIVE_PRICE": "0.50", "LIVE_PRICE_UNIT": "hour", "LIVE_LABEL": "gpu0-",
                "DEVICE": "cpu"})
    done = subprocess.run([sys.executable, "-m", "runner", "live-config"], env=env,
                          capture_output=True, text=True, timeout=patient(15))
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads(done.stdout)
    assert static_config_problems(config, onchain=True) == []
    entries = {entry["app"]: entry for entry in config["runners"]}
    assert sorted(entries) == ["text-to-image", "upscale"]
    for app, entry in entries.items():
        assert entry["label"] == f"gpu0-{app}"
        assert entry["runner_url"] == "http://runner:8000"
        assert entry["health_url"] == "http://runner:8000/ready"
        assert entry["price_info"] == {"price": "0.5", "currency": "usd", "unit": "hour"}

    # Without LIVE_RUNNER_URL the entries name this host's port; capacity is the most the
    # default model's lane admits (max_concurrency + MAX_QUEUE).
    settings = make_settings(pipeline=",".join(APPS), models_file=models_yaml(tmp_path),
                             port=9123, max_queue=3)
    config = live.static_config(settings, build_service(settings, MODULES))
    assert static_config_problems(config) == []
    assert [(e["app"], e["runner_url"], e["health_url"], e["capacity"])
            for e in config["runners"]] == [
        (app, "http://localhost:9123", "http://localhost:9123/ready", 4) for app in APPS]
