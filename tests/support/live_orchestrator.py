"""A loopback double of go-livepeer's Live Runner registry (`-useLiveRunners`), as the runner
meets it: our own code, written from the facts of go-livepeer's ai/runner/live_runner.go and
doc/live-runner.md.

- `POST /runners/heartbeat`: a request without a known `runner_id` registers a new runner and
  needs the registration secret (`-orchSecret`) as its `Authorization`, 401 otherwise; the
  answer carries a new `runner_id` and, only then, the `heartbeat_secret`. A known runner needs
  that heartbeat secret (401 otherwise); a removed runner, or one that sent no heartbeat within
  the TTL, gets 404 "runner not found". Every heartbeat is checked as `normalizeHeartbeat`
  does (400 otherwise): `runner_url` absolute http(s), `app` non-empty and trimmed, `status`
  lowercase and trimmed, `mode` persistent or single-shot, `capacity` >= 0 with 0 read as 1;
  onchain, a positive `price_info.price` in usd per hour or 720p. The answer: `runner_id`,
  `orchestrator`, `heartbeat_interval`, `heartbeat_ttl`, `heartbeat_secret`, `session_ids`
  (the orchestrator's own sessions on that runner).
- `POST /runners/{runner_id}/unregister`: the heartbeat secret (401 otherwise), 404 for an
  unknown, removed or expired runner.
- Discovery: only a runner whose status is "" or "ready" is discoverable and reservable.
- `/apps/{runner_id}/app/{path}`, a single-shot proxy: each request reserves one session
  (ReserveSession: 404 "runner not found" when the runner is not ready, 503 when its sessions
  already reach its capacity), is forwarded to
  `runner_url + "/" + path` with `Livepeer-Runner-Route`, `Livepeer-Session-Id`,
  `Livepeer-Session-Token` and `Livepeer-Session-Control`, and releases its session after.

What the tests read: every heartbeat (`beats`: time, auth, body, status, answer), every
unregister and the proxied sessions. `forget(runner_id)` makes that runner's next heartbeat a
404, `rotate(runner_id)` a 401; `hold()` keeps heartbeats waiting (never longer than
`HOLD_LIMIT_S`) so a test can line up a heartbeat in flight with something else. Every wait is
bounded in time, by limits many times what it takes on a quiet machine; the TTL is long enough
that no runner expires because a busy machine delayed its heartbeats.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.helpers import HANG_S, wait_until

MODES = ("persistent", "single-shot")
READY = ("", "ready")  # isReadyStatus
HOLD_LIMIT_S = HANG_S
TTL = "10m"  # a test that wants a runner gone forgets it: a 404 at its next heartbeat
PROXY_TIMEOUT_S = 60.0
GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
SESSION_HEADERS = ("livepeer-runner-route", "livepeer-session-id", "livepeer-session-token",
                   "livepeer-session-control")


def seconds(duration: str) -> float:
    """A Go duration string ("200ms", "1m30s") in seconds; ValueError if it is not one."""
    parts = GO_DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Go duration: {duration!r}")
    return sum(float(n) * GO_UNITS[u] for n, u in parts)


def absolute_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Beat:
    """One heartbeat as the double saw it: when it was answered, its Authorization, its JSON
    body, the status answered and the answer's body."""

    at: float
    auth: str
    body: dict[str, Any]
    status: int
    answer: dict[str, Any]

    @property
    def app(self) -> str:
        return self.body.get("app", "")

    @property
    def registered(self) -> str:
        """The runner_id this heartbeat registered anew ('' for a follow-up or a refusal)."""
        return self.answer.get("runner_id", "") if self.answer.get("heartbeat_secret") else ""


@dataclass
class Unregister:
    at: float
    runner_id: str
    auth: str
    status: int


@dataclass
class Session:
    runner_id: str
    id: str
    token: str
    opened: float
    closed: float | None = None
    status: int | None = None  # what the runner answered the proxied request
    refused: int | None = None  # the double's own refusal (503), no session held


@dataclass
class Runner:
    id: str
    secret: str
    request: dict[str, Any]
    last: float
    removed: bool = False
    sessions: dict[str, Session] = field(default_factory=dict)

    @property
    def app(self) -> str:
        return self.request["app"]

    @property
    def status(self) -> str:
        return self.request.get("status", "")

    @property
    def capacity(self) -> int:
        return self.request["capacity"]


class LiveOrchestrator:
    def __init__(self, secret: str = "orch-secret", interval: str = "200ms", ttl: str = TTL,
                 onchain: bool = False, unregister_delay: float = 0.0):
        self.secret = secret
        self.unregister_delay = unregister_delay  # an orchestrator slow to answer
        self.interval = interval
        self.ttl = ttl
        self.onchain = onchain
        self.url = ""  # set by serve()
        self.lock = threading.Lock()
        self.runners: dict[str, Runner] = {}
        self.beats: list[Beat] = []
        self.unregisters: list[Unregister] = []
        self.sessions: list[Session] = []
        self.held = threading.Event()
        self.waiting = 0  # heartbeats held right now
        self.app = Starlette(routes=[
            Route("/runners/heartbeat", self._heartbeat, methods=["POST"]),
            Route("/runners/{runner_id}/unregister", self._unregister, methods=["POST"]),
            Route("/discovery", self._discovery, methods=["GET"]),
            Route("/apps/{runner_id}/app/{path:path}", self._proxy,
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ])

    # -- what tests call --------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[LiveOrchestrator]:
        """The double on a free loopback port (uvicorn in a thread), `url` set meanwhile."""
        from tests.conftest import LiveServer

        with LiveServer(self.app) as server:
            self.url = server.url
            yield self

    def forget(self, runner_id: str) -> None:
        """As if the runner had expired or been removed: its next heartbeat is a 404."""
        with self.lock:
            self.runners[runner_id].removed = True

    def rotate(self, runner_id: str) -> None:
        """A new heartbeat secret the runner was never told: its next heartbeat is a 401."""
        with self.lock:
            self.runners[runner_id].secret = secrets.token_urlsafe(24)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Heartbeats wait (each at most HOLD_LIMIT_S) until the block ends."""
        self.held.set()
        try:
            yield
        finally:
            self.held.clear()

    def ready(self, app: str) -> list[Runner]:
        """Discovery: the runners of `app` a client could reserve now."""
        now = time.monotonic()
        with self.lock:
            return [r for r in self.runners.values()
                    if r.app == app and self._alive(r, now) and r.status in READY]

    def alive(self) -> list[Runner]:
        """The runners registered now (not removed, not expired), whatever their status."""
        now = time.monotonic()
        with self.lock:
            return [r for r in self.runners.values() if self._alive(r, now)]

    def beats_of(self, runner_id: str) -> list[Beat]:
        with self.lock:
            return [b for b in self.beats if b.body.get("runner_id") == runner_id
                    or b.answer.get("runner_id") == runner_id]

    def registrations(self, app: str | None = None) -> list[Beat]:
        """The heartbeats that registered a runner, in order."""
        with self.lock:
            return [b for b in self.beats if b.registered and (app is None or b.app == app)]

    def snapshot(self) -> tuple[list[Beat], list[Unregister]]:
        with self.lock:
            return list(self.beats), list(self.unregisters)

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = HANG_S,
                 step: float = 0.02) -> Any:
        """Poll `check` until it returns something truthy, at most `timeout` seconds."""
        return wait_until(check, what, timeout, step)

    # -- the registry -----------------------------------------------------------------------

    def _alive(self, runner: Runner, now: float) -> bool:
        return not runner.removed and now - runner.last <= seconds(self.ttl)

    def _normalise(self, body: dict[str, Any]) -> dict[str, Any]:
        """normalizeHeartbeat's checks; 400 for what it refuses."""
        req = dict(body)
        if not isinstance(req.get("runner_url"), str) or not absolute_http(req["runner_url"]):
            raise Refused(400, "invalid runner_url")
        app = req.get("app")
        if not isinstance(app, str) or not app or app != app.strip():
            raise Refused(400, "app must be trimmed")
        status = req.get("status", "")
        if not isinstance(status, str) or status != status.strip().lower():
            raise Refused(400, "status must be lowercase and trimmed")
        req["mode"] = {"": "persistent", "single_shot": "single-shot"}.get(
            req.get("mode", ""), req.get("mode"))
        if req["mode"] not in MODES:
            raise Refused(400, 'mode must be "persistent" or "single-shot"')
        capacity = req.get("capacity", 0)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise Refused(400, "capacity must be >= 0")
        req["capacity"] = capacity or 1
        if self.onchain:
            self._check_price(req.get("price_info") or {})
        return req

    @staticmethod
    def _check_price(info: dict[str, Any]) -> None:
        try:
            price = Decimal(str(info.get("price", "")).strip())
        except InvalidOperation:
            price = Decimal(0)
        if not price.is_finite() or price <= 0:
            raise Refused(400, "price_info.price must be a positive decimal")
        if (info.get("currency") or "usd").strip().lower() != "usd":
            raise Refused(400, "price_info.currency must be usd")
        if (info.get("unit") or "hour").strip().lower() not in ("hour", "720p"):
            raise Refused(400, "price_info.unit must be hour or 720p")

    def _beat(self, body: dict[str, Any], auth: str) -> dict[str, Any]:
        req = self._normalise(body)
        runner_id = str(req.get("runner_id") or "").strip()
        now = time.monotonic()
        with self.lock:
            runner = self.runners.get(runner_id) if runner_id else None
            fresh = runner is None
            if fresh:
                if not secrets.compare_digest(auth.encode(), self.secret.encode()):
                    raise Refused(401, "invalid registration authorization")
                runner_id = runner_id or f"runner_{secrets.token_hex(5)}"
                runner = Runner(runner_id, secrets.token_urlsafe(24), req, now)
                self.runners[runner_id] = runner
            else:
                assert runner is not None
                if not self._alive(runner, now):
                    raise Refused(404, "runner not found")
                if not secrets.compare_digest(auth.encode(), runner.secret.encode()):
                    raise Refused(401, "invalid heartbeat authorization")
            runner.request = {**req, "runner_id": runner_id}
            runner.last = now
            answer = {"runner_id": runner_id, "orchestrator": self.url,
                      "heartbeat_interval": self.interval, "heartbeat_ttl": self.ttl,
                      "session_ids": sorted(runner.sessions)}
            if fresh:
                answer["heartbeat_secret"] = runner.secret
            return answer

    async def _heartbeat(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        body = await request.json()
        if self.held.is_set():
            self.waiting += 1
            try:
                deadline = time.monotonic() + HOLD_LIMIT_S
                while self.held.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                self.waiting -= 1
        try:
            answer, status = self._beat(body, auth), 200
        except Refused as refused:
            answer, status = {"error": refused.message}, refused.status
        with self.lock:
            self.beats.append(Beat(time.monotonic(), auth, body, status, answer))
        if status != 200:
            return Response(answer["error"], status_code=status, media_type="text/plain")
        return JSONResponse(answer)

    async def _unregister(self, request: Request) -> Response:
        runner_id = request.path_params["runner_id"]
        auth = request.headers.get("authorization", "")
        await asyncio.sleep(min(self.unregister_delay, HOLD_LIMIT_S))
        with self.lock:
            runner = self.runners.get(runner_id)
            if runner is None or not self._alive(runner, time.monotonic()):
                status = 404
            elif not secrets.compare_digest(auth.encode(), runner.secret.encode()):
                status = 401
            else:
                runner.removed, status = True, 200
            self.unregisters.append(Unregister(time.monotonic(), runner_id, auth, status))
        if status != 200:
            return Response({404: "runner not found", 401: "invalid authorization"}[status],
                            status_code=status, media_type="text/plain")
        return Response(status_code=200)

    async def _discovery(self, request: Request) -> Response:
        app = request.query_params.get("app", "")
        now = time.monotonic()
        with self.lock:
            runners = [r for r in self.runners.values() if not app or r.app == app]
            return JSONResponse([{
                "runner_id": r.id, "app": r.app, "mode": r.request["mode"],
                "capacity": r.capacity, "capacity_used": len(r.sessions),
                "capacity_available": max(0, r.capacity - len(r.sessions)),
                "price_info": r.request.get("price_info"),
            } for r in runners if self._alive(r, now) and r.status in READY])

    # -- the proxy --------------------------------------------------------------------------

    def _reserve(self, runner_id: str) -> tuple[Session, str]:
        with self.lock:
            runner = self.runners.get(runner_id)
            if runner is None or not self._alive(runner, time.monotonic()) \
                    or runner.status not in READY:
                raise Refused(404, "runner not found")
            if len(runner.sessions) >= runner.capacity:
                raise Refused(503, "no capacity available for runner")
            session = Session(runner_id, f"session_{secrets.token_hex(5)}",
                              secrets.token_urlsafe(16), time.monotonic())
            runner.sessions[session.id] = session
            self.sessions.append(session)
            return session, runner.request["runner_url"]

    def _release(self, session: Session) -> None:
        with self.lock:
            session.closed = time.monotonic()
            runner = self.runners.get(session.runner_id)
            if runner is not None:
                runner.sessions.pop(session.id, None)

    async def _proxy(self, request: Request) -> Response:
        runner_id = request.path_params["runner_id"]
        try:
            session, runner_url = self._reserve(runner_id)
        except Refused as refused:
            with self.lock:
                self.sessions.append(Session(runner_id, "", "", time.monotonic(),
                                             time.monotonic(), refused=refused.status))
            return Response(refused.message, status_code=refused.status,
                            media_type="text/plain")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", *SESSION_HEADERS)}
        headers.update({"Livepeer-Runner-Route": runner_id, "Livepeer-Session-Id": session.id,
                        "Livepeer-Session-Token": session.token,
                        "Livepeer-Session-Control": self.url})
        target = runner_url.rstrip("/") + "/" + request.path_params["path"]
        try:
            async with httpx.AsyncClient(timeout=PROXY_TIMEOUT_S) as client:
                answer = await client.request(request.method, target, headers=headers,
                                              content=await request.body(),
                                              params=request.query_params)
        finally:
            self._release(session)
        session.status = answer.status_code
        kept = {k: v for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                     "content-encoding")}
        return Response(answer.content, status_code=answer.status_code, headers=kept)


# -- the static configuration ------------------------------------------------------------------

def static_config_problems(config: Any, onchain: bool = False) -> list[str]:
    """What go-livepeer (ParseStaticLiveRunnerConfig, buildStaticRunner, normalizeHeartbeat)
    would refuse in a `-liveRunnerConfig` file, plus what this runner promises of its entries
    (single-shot, capacity >= 1, health read from /ready as exactly 200); empty when none."""
    if not isinstance(config, dict) or not isinstance(config.get("runners"), list):
        return ['not {"runners": [...]}']
    problems: list[str] = []
    labels: set[str] = set()
    double = LiveOrchestrator(onchain=onchain)
    for i, entry in enumerate(config["runners"]):
        def bad(what: str, i: int = i) -> None:
            problems.append(f"runners[{i}]: {what}")

        label = entry.get("label", "")
        if not label or label != label.strip():
            bad("label is required and must be trimmed")
        if label in labels:
            bad(f"duplicate label {label!r}")
        labels.add(label)
        if entry.get("routing", "runner-id") not in ("runner-id", "label"):
            bad("routing must be runner-id or label")
        health = entry.get("health_url", "")
        if not isinstance(health, str) or not absolute_http(health):
            bad("invalid health_url")
        elif not health.endswith("/ready"):
            bad(f"health_url {health} is not the runner's /ready")
        if entry.get("healthy_status_code") != 200:
            bad("healthy_status_code is not 200")
        if entry.get("mode") != "single-shot":
            bad("mode is not single-shot")
        if not isinstance(entry.get("capacity"), int) or entry["capacity"] < 1:
            bad("capacity is not >= 1")
        price = entry.get("price_info")
        if not isinstance(price, dict) or not {"price", "currency", "unit"} <= set(price):
            bad("price_info lacks price, currency or unit")
        try:
            double._normalise({**entry, "status": ""})
        except Refused as refused:
            bad(refused.message)
    return problems
