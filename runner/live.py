"""Serving through go-livepeer's Live Runner registry (doc/live-runner.md there).

An orchestrator started with `-useLiveRunners` reverse-proxies a client's
`/apps/{runner_id}/.../app/<path>` to `runner_url + /<path>`, so each served pipeline is
registered as its own single-shot app, whose path is the pipeline's contract route. Two ways:

- static: the operator pastes `python -m runner live-config` into go-livepeer's
  `-liveRunnerConfig` file; the orchestrator polls `/ready` and wants exactly 200.
- dynamic (LIVE_ORCH_URL, LIVE_ORCH_SECRET, LIVE_RUNNER_URL set): this module registers every
  pipeline with `POST /runners/heartbeat` and keeps heartbeating at the interval the
  orchestrator returns, with the secret it returns; a 404 means register again.

Capacity is what the runner can take now, read on every heartbeat: the free places of the
pipeline's default model's lane (and of the runner's total), plus the orchestrator sessions
already in hand there (it counts those itself). A pipeline that cannot take a request is sent
as not ready, since go-livepeer treats a capacity of 0 as 1.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from runner import hardware
from runner.service import Service
from runner.settings import Settings

log = logging.getLogger(__name__)
MODE = "single-shot"  # one proxied request per session: request/response pipelines
SESSION_HEADER = b"livepeer-session-id"
REQUEST_TIMEOUT_S = 5.0
DEFAULT_INTERVAL_S = 5.0  # until the orchestrator says otherwise
GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str, default: float) -> float:
    """Seconds in a Go duration string ("5s", "1m30s", "250ms"); `default` if unreadable."""
    parts = GO_DURATION.findall(text or "")
    if not parts or "".join(n + u for n, u in parts) != text:
        return default
    return sum(float(n) * GO_UNITS[u] for n, u in parts)


class GPU(BaseModel):
    id: str
    name: str = ""
    vram_mb: int = 0


class PriceInfo(BaseModel):
    price: str
    currency: str = "usd"
    unit: str = "hour"


class Registered(BaseModel):
    """The orchestrator's answer to a heartbeat."""

    runner_id: str
    orchestrator: str = ""
    heartbeat_interval: str = ""
    heartbeat_ttl: str = ""
    heartbeat_secret: str = ""
    session_ids: list[str] | None = None


def gpu(service: Service) -> GPU | None:
    """The serving GPU as NVML names it (torch's cuda:index, CUDA_VISIBLE_DEVICES applied);
    None on a CPU runner."""
    if not service.device.is_cuda:
        return None
    info = hardware.cuda_info(service.device.index)
    if not info:
        return GPU(id=str(service.device.index))
    return GPU(id=str(info["id"]), name=str(info["name"]), vram_mb=info["memory_total"] >> 20)


def price_info(settings: Settings) -> PriceInfo:
    """LIVE_PRICE in USD per LIVE_PRICE_UNIT; unset is free (offchain orchestrators only)."""
    price = settings.live_price if settings.live_price is not None else Decimal(0)
    return PriceInfo(price=format(price.normalize(), "f"), unit=settings.live_price_unit)


def describe(settings: Settings, app: str, found: GPU | None) -> dict[str, Any]:
    """What every registration of `app` says of itself, in the static file and in each
    heartbeat alike."""
    return {"label": f"{settings.live_label}{app}", "app": app, "version": settings.version,
            "mode": MODE, "price_info": price_info(settings).model_dump(),
            **({"gpu": found.model_dump()} if found is not None else {})}


class LiveSessions:
    """ASGI middleware: the orchestrator sessions in hand per route path (the proxy adds
    `Livepeer-Session-Id` to every request it forwards), for the capacity and `session_ids` of
    each heartbeat."""

    def __init__(self, app: ASGIApp, sessions: dict[str, set[str]]):
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = dict(scope.get("headers", ())).get(SESSION_HEADER) \
            if scope["type"] == "http" else None
        if not session:
            await self.app(scope, receive, send)
            return
        held = self.sessions.setdefault(scope["path"].rstrip("/"), set())
        sid = session.decode("latin-1")
        held.add(sid)
        try:
            await self.app(scope, receive, send)
        finally:
            held.discard(sid)


@dataclass
class Registration:
    """One pipeline's registration: empty until the orchestrator has answered."""

    app: str
    runner_id: str = ""
    secret: str = ""
    interval: float = DEFAULT_INTERVAL_S
    state: str = "unregistered"  # what was last logged: logs follow changes only
    beats: int = 0


@dataclass
class Registrar:
    """Dynamic registration of every served pipeline, heartbeating until stopped. Failures
    never touch serving: they are logged once per change and retried on the next beat."""

    settings: Settings
    service: Service
    sessions: dict[str, set[str]] = field(default_factory=dict)
    # one client for the registrar's life: its connection to the orchestrator is reused
    # by every heartbeat instead of opened again each time
    client: httpx.AsyncClient = field(
        default_factory=lambda: httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S))
    registrations: list[Registration] = field(init=False)

    def __post_init__(self) -> None:
        self.registrations = [Registration(app=name) for name in self.service.specs]
        self.gpu = gpu(self.service)
        self.service.on_drain.append(self.withdraw)

    @property
    def orchestrator(self) -> str:
        return self.settings.live_orch_url.rstrip("/")

    # -- what each heartbeat says ----------------------------------------------------------

    def capacity(self, app: str) -> int:
        """Requests this runner would admit for `app` now, plus the orchestrator's sessions
        already in hand there (it counts those against the capacity itself)."""
        if not self.service.ready:
            return 0
        return self.service.room(app) + len(self.sessions.get(f"/{app}", ()))

    def status(self, app: str, capacity: int) -> str:
        """"ready" is the only discoverable status besides ""."""
        if self.service.draining:
            return "draining"
        if self.service.health not in ("IDLE", "OK"):
            return self.service.health.lower()
        return "ready" if capacity > 0 else "busy"

    def heartbeat(self, reg: Registration) -> dict[str, Any]:
        capacity = self.capacity(reg.app)
        body: dict[str, Any] = {
            **describe(self.settings, reg.app, self.gpu),
            "runner_url": self.settings.live_runner_url.rstrip("/"), "capacity": capacity,
            "status": self.status(reg.app, capacity),
            "session_ids": sorted(self.sessions.get(f"/{reg.app}", ())),
        }
        if reg.runner_id:
            body["runner_id"] = reg.runner_id
        return body

    # -- the protocol ----------------------------------------------------------------------

    async def beat(self, reg: Registration) -> None:
        """One heartbeat (a registration when there is no secret yet); a 404 or 401 on a
        follow-up forgets the registration and registers again at once. A beat answered after
        draining began (withdraw ran while it was in flight) leaves nothing registered: no new
        registration after a 404, and a registration it made is withdrawn at once."""
        if self.service.draining:  # withdrawn: a beat in flight must not register again
            return
        first = not reg.secret
        auth = self.settings.live_orch_secret if first else reg.secret
        answer = await self._post("/runners/heartbeat", auth, self.heartbeat(reg))
        if answer.status_code in (401, 404) and not first:
            reg.runner_id, reg.secret = "", ""
            if self.service.draining:
                self._note(reg, f"withdrawn ({answer.status_code})")
                return
            self._note(reg, f"lost ({answer.status_code}); registering again")
            await self.beat(reg)
            return
        if answer.status_code != 200:
            self._note(reg, f"refused: {answer.status_code} {answer.text.strip()[:200]}")
            return
        got = Registered.model_validate(answer.json())
        reg.runner_id, reg.secret = got.runner_id, got.heartbeat_secret or reg.secret
        reg.interval = go_duration(got.heartbeat_interval, DEFAULT_INTERVAL_S)
        reg.beats += 1
        self._note(reg, f"registered as {reg.runner_id}")
        if self.service.draining:
            await self.unregister(reg)

    async def unregister(self, reg: Registration) -> None:
        """Withdraw the registration; it is forgotten before the request goes, so a beat
        answered meanwhile does not withdraw it a second time."""
        runner_id, secret = reg.runner_id, reg.secret
        if not secret:
            return
        reg.runner_id, reg.secret = "", ""
        answer = await self._post(f"/runners/{runner_id}/unregister", secret, None)
        self._note(reg, f"unregistered ({answer.status_code})")

    async def _post(self, path: str, auth: str, body: dict | None) -> httpx.Response:
        return await self.client.post(self.orchestrator + path, json=body,
                                      headers={"Authorization": auth})

    def _note(self, reg: Registration, state: str) -> None:
        """Log a registration's state when it changes, not on every beat."""
        kind = state.split(" ")[0]
        if kind != reg.state:
            level = logging.INFO if kind in ("registered", "unregistered") else logging.WARNING
            log.log(level, "live runner %s: %s", reg.app, state)
        reg.state = kind

    # -- the loops -------------------------------------------------------------------------

    async def keep(self, reg: Registration) -> None:
        while not self.service.draining:
            try:
                await self.beat(reg)
            except (httpx.HTTPError, ValueError) as exc:  # unreachable, or an odd answer
                self._note(reg, f"unreachable: {type(exc).__name__}: {exc}")
            await asyncio.sleep(reg.interval)

    async def run(self) -> None:
        await asyncio.gather(*(self.keep(reg) for reg in self.registrations))

    async def withdraw(self) -> None:
        """On SIGTERM, before in-flight requests drain (a Service.on_drain hook): heartbeats
        stop and every registration is withdrawn, so the orchestrator sends nothing more."""
        results = await asyncio.gather(*(self.unregister(reg) for reg in self.registrations),
                                       return_exceptions=True)
        for reg, result in zip(self.registrations, results, strict=True):
            if isinstance(result, Exception):
                self._note(reg, f"unregister failed: {type(result).__name__}")

    async def close(self) -> None:
        """At shutdown, once the heartbeats are stopped and the registrations withdrawn."""
        await self.client.aclose()


def static_config(settings: Settings, service: Service) -> dict[str, Any]:
    """go-livepeer's `-liveRunnerConfig` file for this runner: one single-shot entry per
    served pipeline, health read from /ready (exactly 200 while serving), capacity the most
    its default model's lane admits."""
    base = (settings.live_runner_url or f"http://localhost:{settings.port}").rstrip("/")
    found = gpu(service)
    return {"runners": [{
        **describe(settings, name, found), "routing": "runner-id", "runner_url": base,
        "health_url": f"{base}/ready", "healthy_status_code": 200,
        "capacity": service.room(name, idle=True),
    } for name in service.specs]}


def registrar(settings: Settings, service: Service) -> Registrar | None:
    """Dynamic registration when its three settings are given; None otherwise."""
    wanted = {"LIVE_ORCH_URL": settings.live_orch_url,
              "LIVE_ORCH_SECRET": settings.live_orch_secret,
              "LIVE_RUNNER_URL": settings.live_runner_url}
    if not any(wanted.values()):
        return None
    if missing := [name for name, value in wanted.items() if not value]:
        raise ValueError(f"Live Runner registration needs {', '.join(missing)} as well")
    return Registrar(settings, service)
