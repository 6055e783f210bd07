"""Every route: one POST per pipeline module, generated; health, version, hardware, models.

No `from __future__ import annotations` here: FastAPI reads the generated endpoints'
annotations at definition time, and they name per-module classes.
"""

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Form, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from runner import errors, hardware, metrics, openai, views
from runner.errors import Busy, BusyReason, ClientClosed, FieldError, RunnerError, Unauthorized
from runner.protocol import (
    HardwareInformation,
    HardwareStats,
    HealthCheck,
    Readiness,
    Version,
)
from runner.service import Service
from runner.settings import Settings
from runner.spec import PipelineSpec
from runner.streaming import stream_events

log = logging.getLogger(__name__)
FORM_FIELD_BYTES = 8 << 20
DISCONNECT_POLL_SECONDS = 0.25
T = TypeVar("T")


def bearer_auth(token: str):
    scheme = HTTPBearer(auto_error=False)

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
        if not token:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("Invalid bearer token")

    return check


def decodable(service: Service, settings: Settings) -> dict[str, frozenset[int]]:
    """Each generate route's path (and its slash alias) -> the statuses go-livepeer's client
    decodes on it; empty when ERROR_STATUSES=http (errors.for_client leaves them alone)."""
    if settings.error_statuses == "http":
        return {}
    return {path: frozenset({200, *spec.error_statuses})
            for spec in service.specs.values() for path in with_slash(f"/{spec.name}")}


def with_slash(path: str) -> tuple[str, str]:
    """A route's path and its trailing-slash alias, which the reference answers too."""
    return path, f"{path}/"


def add_route(router: APIRouter, path: str, endpoint: Callable, operation: str,
              **options: Any) -> None:
    """The route, and its trailing-slash alias out of the schema."""
    plain, slash = with_slash(path)
    router.add_api_route(plain, endpoint, operation_id=operation, **options)
    router.add_api_route(slash, endpoint, operation_id=f"{operation}_slash",
                         include_in_schema=False, **options)


def generate_router(service: Service, settings: Settings) -> APIRouter:
    # Form fields may carry JSON arrays (SAM2's 1x256x256 mask_input is ~1.5 MB as Go writes
    # it), past Starlette's 1 MiB default per field; the body cap still bounds the total.
    router = APIRouter(tags=["generate"], dependencies=[Depends(bearer_auth(settings.auth_token))],
                       form_limits={"max_part_size": FORM_FIELD_BYTES})
    for spec in service.specs.values():
        add_generate_route(router, spec, service,
                           errors.documented(spec.error_statuses, settings.error_statuses))
    return router


async def until_disconnect(http: HTTPRequest, work: Awaitable[T]) -> T:
    """Await `work` while watching the connection: a client that goes away (go-livepeer's
    timeout, a closed app) cancels it, which stops the run at its next step and frees its
    place for the requests still waiting."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            if await http.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            metrics.CANCELLED.inc()
            raise ClientClosed("the client closed the connection; the run was stopped") from None
        raise
    finally:
        watcher.cancel()


def add_generate_route(router: APIRouter, spec: PipelineSpec, service: Service,
                       responses: dict) -> None:
    Request = spec.request

    async def respond(request: BaseModel, response: Response, http: HTTPRequest):
        result: BaseModel | EventSourceResponse
        try:
            if spec.wants_stream(request):
                result = await stream_events(service, spec, request)
            else:
                timings: dict[str, float] = {}
                result = await until_disconnect(http, service.generate(spec, request,
                                                                       timings))
                response.headers["Server-Timing"] = server_timing(timings)
        except RunnerError as exc:
            metrics.REQUESTS.labels(spec.name, str(exc.status_code)).inc()
            raise
        except Exception:
            metrics.REQUESTS.labels(spec.name, "500").inc()
            raise
        metrics.REQUESTS.labels(spec.name, "200").inc()
        return result

    if spec.multipart:
        # The request type is the pipeline's, known only here: FastAPI reads it at run time.
        async def endpoint(request: Annotated[Request, Form(  # type: ignore[valid-type]
                               media_type="multipart/form-data")],
                           response: Response, http: HTTPRequest) -> BaseModel:
            return await respond(request, response, http)
    else:
        async def endpoint(request: Request, response: Response,  # type: ignore[valid-type]
                           http: HTTPRequest) -> BaseModel:
            return await respond(request, response, http)

    options = dict(
        methods=["POST"], response_model=spec.response, responses=responses,
        summary=spec.summary, description=spec.doc.split("\n\n")[0],
    )
    add_route(router, f"/{spec.name}", endpoint, spec.operation_id, **options)


def json_paths(service: Service) -> set[str]:
    """Paths of the generate routes whose body is JSON, with their trailing-slash aliases."""
    names = [spec.name for spec in service.specs.values() if not spec.multipart]
    return {path for name in names for path in with_slash(f"/{name}")}


def server_timing(timings: dict[str, float]) -> str:
    """`model;dur=1.2, denoise;dur=830.0, ...` in milliseconds (RFC Server-Timing)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


def status_router(service: Service, settings: Settings) -> APIRouter:
    router = APIRouter()

    def default_model_id() -> str:
        if settings.model_id:
            return settings.model_id
        return ",".join(service.registry.default(name).id for name in service.specs)

    async def health() -> HealthCheck:
        return HealthCheck(status=service.health)

    def named(http: HTTPRequest) -> views.View:
        """The pipeline and model a status route names: its view's (runner/views.py), or at
        the root PIPELINE and the default model (comma-joined where several are served)."""
        return views.of(http.scope) or views.View(settings.pipeline, default_model_id())

    async def version(http: HTTPRequest) -> Version:
        view = named(http)
        return Version(pipeline=view.pipeline, model_id=view.model_id,
                       version=settings.version, mode=service.mode)

    def hardware_info(http: HTTPRequest) -> HardwareInformation:
        view = named(http)
        return HardwareInformation(pipeline=view.pipeline, model_id=view.model_id,
                                   gpu_info=hardware.gpu_info())

    def hardware_stats(http: HTTPRequest) -> HardwareStats:
        view = named(http)
        return HardwareStats(pipeline=view.pipeline, model_id=view.model_id,
                             gpu_stats=hardware.gpu_stats())

    for path, endpoint, model in (("/health", health, HealthCheck),
                                  ("/version", version, Version),
                                  ("/hardware/info", hardware_info, HardwareInformation),
                                  ("/hardware/stats", hardware_stats, HardwareStats)):
        add_route(router, path, endpoint, endpoint.__name__, methods=["GET"],
                  response_model=model)

    @router.get("/ready", operation_id="ready", include_in_schema=False,
                response_model=Readiness)
    async def ready(response: Response) -> Readiness:
        if not service.ready:
            response.status_code = 503
        return Readiness(ready=service.ready,
                         status="DRAINING" if service.draining else service.health)

    @router.get("/models", operation_id="models", include_in_schema=False)
    async def models() -> dict:
        """The cache's budget and models; `on_demand`: warm models the budget cannot keep
        pinned beside the others, loaded per request and swapped; `default_requests`: per
        served pipeline, what its default-sized request holds (the warm plan's promise)."""
        return {**service.cache.summary(), "on_demand": [e.id for e in service.on_demand()],
                "default_requests": service.default_requests(),
                "models": service.cache.describe()}

    return router


def models_router(service: Service, settings: Settings) -> APIRouter:
    """Operator control of the warm cache: load, pin or unload a listed model by id (ids
    contain '/', hence the path converter); `pipeline` picks among pipelines sharing an id."""
    router = APIRouter(prefix="/models", tags=["models"], include_in_schema=False,
                       dependencies=[Depends(bearer_auth(settings.auth_token))])

    def entry_for(model_id: str, pipeline: str):
        names = [pipeline] if pipeline else [
            n for n in service.specs if model_id in {e.id for e in service.registry.entries(n)}]
        if pipeline and pipeline not in service.specs:
            raise FieldError("pipeline", f"this runner does not serve {pipeline!r}")
        if len(names) != 1:
            where = ", ".join(names) or "no served pipeline"
            raise FieldError("model_id", f"{model_id!r} is listed for {where}; "
                             "name one with ?pipeline=")
        return service.registry.resolve(names[0], model_id)

    def state(entry) -> dict:
        return next((d for d in service.cache.describe()
                     if d["id"] == entry.id and d["pipeline"] == entry.pipeline),
                    {"id": entry.id, "pipeline": entry.pipeline, "state": "cold"})

    @router.post("/{model_id:path}/load")
    async def load(model_id: str, pipeline: str = "") -> dict:
        entry = entry_for(model_id, pipeline)
        await service.cache.load(entry)
        return state(entry)

    @router.post("/{model_id:path}/pin")
    async def pin(model_id: str, pipeline: str = "") -> dict:
        entry = entry_for(model_id, pipeline)
        await service.cache.pin(entry)
        return state(entry)

    @router.post("/{model_id:path}/unload")
    async def unload(model_id: str, pipeline: str = "") -> dict:
        entry = entry_for(model_id, pipeline)
        if not await service.cache.unload(entry):
            raise Busy(entry.id, BusyReason.IN_USE,
                       f"{entry.id} is serving requests; retry when they finish", retry_after=1)
        return state(entry)

    return router


def install(app: FastAPI, service: Service, settings: Settings) -> None:
    app.include_router(status_router(service, settings))
    app.include_router(models_router(service, settings))
    app.include_router(generate_router(service, settings))
    for spec in service.specs.values():
        if spec.openai_chat:
            app.include_router(openai.router(service, spec, bearer_auth(settings.auth_token)))
