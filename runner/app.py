"""create_app(settings) -> FastAPI: the whole server, ready for uvicorn or a test client."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import make_asgi_app
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runner import __version__, errors, live, routes, views
from runner.backpressure import BusyLog
from runner.middleware import BodyLimit, InFlight, JsonBodies
from runner.registry import Registry
from runner.service import Service
from runner.settings import Settings
from runner.spec import PipelineSpec, check_defaults, discover, read

log = logging.getLogger(__name__)


def build_service(settings: Settings,
                  modules: dict[str, types.ModuleType] | None = None) -> Service:
    available = modules if modules is not None else discover()
    names = settings.pipeline_names(sorted(available))
    unknown = [n for n in names if n not in available]
    if unknown:
        elsewhere = [n for n in unknown if n in discover(installed_only=False)]
        if elsewhere:
            raise ValueError(f"{elsewhere} cannot be served from this environment (their "
                             "libraries are not installed); see the README for its environment")
        raise ValueError(f"PIPELINE names unknown pipelines {unknown}; "
                         f"available: {', '.join(sorted(available))}")
    served = {n: read(available[n]) for n in names}
    registry = Registry.load(settings.models_file, _model_id_defaults(settings, served))
    missing = [n for n in served if n not in registry.pipelines]
    if missing:
        raise ValueError(f"{settings.models_file} lists no models for {missing}")
    if settings.billed_defaults:
        for name, spec in served.items():
            if billed := spec.billed_defaults:
                registry.override_defaults(name, billed)
                log.info("%s: unset %s take what go-livepeer bills for them, %s "
                         "(BILLED_DEFAULTS=false: each model's own)", name, ", ".join(billed),
                         billed)
    check_defaults(registry, served)
    return Service(settings, registry, served)


def _model_id_defaults(settings: Settings, served: dict[str, PipelineSpec]) -> dict[str, str]:
    """MODEL_ID picks the default model of a single-pipeline runner, as go-livepeer sets it."""
    if not settings.model_id:
        return {}
    if len(served) != 1:
        raise ValueError("MODEL_ID needs exactly one PIPELINE")
    return {next(iter(served)): settings.model_id}


def create_app(settings: Settings | None = None,
               modules: dict[str, types.ModuleType] | None = None) -> FastAPI:
    settings = settings or Settings()
    service = build_service(settings, modules)

    registrar = live.registrar(settings, service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Uvicorn binds the port only after startup returns, so loading runs in the background.
        background = [asyncio.create_task(service.warm_up())]
        if registrar is not None:
            background.append(asyncio.create_task(registrar.run()))
        app.state.begin_drain = drainer(service)
        yield
        await service.drain()  # where no SIGTERM began it (a test client, an embedding app)
        for task in background:
            task.cancel()
        if registrar is not None:
            await registrar.close()
        await service.close()

    app = FastAPI(title="Livepeer AI Runner", description="An application to run AI pipelines",
                  version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.decodable = routes.decodable(service, settings)
    errors.install(app, on_busy=BusyLog(settings.busy_log_seconds).refused)
    app.add_middleware(JsonBodies, paths=routes.json_paths(service))
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_bytes),
                       decodable=app.state.decodable,
                       stall_seconds=settings.body_stall_seconds,
                       drain_bytes=settings.drain_bytes(),
                       drain_seconds=settings.upload_drain_seconds)
    app.add_middleware(InFlight, count=service.in_flight)
    if registrar is not None:
        app.add_middleware(live.LiveSessions, sessions=registrar.sessions)
    app.add_middleware(views.PipelineViews,
                       views=views.table(list(service.specs), service.registry))
    routes.install(app, service, settings)
    install_metrics(app)
    log.info("serving %s in %s mode from %s", ", ".join(service.specs), service.mode,
             service.model_dir)
    if len(service.specs) > 1:
        log.info("go-livepeer: list each pipeline in aiModels.json with its own url, "
                 "http://<this host>:%d%s/<pipeline>[/<model_id>]", settings.port, views.PREFIX)
    return app


def install_metrics(app: FastAPI) -> None:
    """The Prometheus exposition at GET /metrics itself, the path scrape configs name (a mount
    alone answers it with a redirect to /metrics/, which keeps working too)."""
    exposition = make_asgi_app()
    app.router.routes.append(Route("/metrics", Endpoint(exposition), methods=["GET"],
                                   include_in_schema=False))
    app.mount("/metrics", exposition)


class Endpoint:
    """An ASGI app as a route's endpoint: a route calls a plain function with a Request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def drainer(service: Service) -> Callable[[], None]:
    """What the process's SIGTERM handler calls (runner/__main__.py): begin draining on the
    event loop at once, before uvicorn waits for in-flight requests, so /ready says 503 and
    the Live Runner registrations are withdrawn while they finish."""
    loop = asyncio.get_running_loop()
    started: list[asyncio.Task] = []

    def begin() -> None:
        loop.call_soon_threadsafe(lambda: started.append(loop.create_task(service.drain())))

    return begin
