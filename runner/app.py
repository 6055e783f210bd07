"""create_app(settings) -> FastAPI: the whole server, ready for uvicorn or a test client."""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import make_asgi_app

from runner import __version__, errors, routes
from runner.middleware import BodyLimit, InFlight, JsonBodies
from runner.pipeline import billed_defaults, check_defaults, discover
from runner.registry import Registry
from runner.service import Service
from runner.settings import Settings

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
    served = {n: available[n] for n in names}
    registry = Registry.load(settings.models_file, _model_id_defaults(settings, served))
    missing = [n for n in served if n not in registry.pipelines]
    if missing:
        raise ValueError(f"{settings.models_file} lists no models for {missing}")
    if settings.billed_defaults:
        for name, module in served.items():
            if billed := billed_defaults(module):
                registry.override_defaults(name, billed)
                log.info("%s: unset %s take what go-livepeer bills for them, %s "
                         "(BILLED_DEFAULTS=false: each model's own)", name, ", ".join(billed),
                         billed)
    check_defaults(registry, served)
    return Service(settings, registry, served)


def _model_id_defaults(settings: Settings, served: dict) -> dict[str, str]:
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Uvicorn binds the port only after startup returns, so loading runs in the background.
        warm_up = asyncio.create_task(service.warm_up())
        yield
        warm_up.cancel()
        await service.close()

    app = FastAPI(title="Livepeer AI Runner", description="An application to run AI pipelines",
                  version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.decodable = routes.decodable(service, settings)
    errors.install(app)
    app.add_middleware(JsonBodies, paths=routes.json_paths(service))
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_bytes),
                       decodable=app.state.decodable,
                       stall_seconds=settings.body_stall_seconds)
    app.add_middleware(InFlight, count=service.in_flight)
    routes.install(app, service, settings)
    app.mount("/metrics", make_asgi_app())
    log.info("serving %s in %s mode from %s", ", ".join(service.modules), service.mode,
             service.model_dir)
    return app
