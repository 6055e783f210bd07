"""Every route: one POST per pipeline module, generated; health, version, hardware, models.

No `from __future__ import annotations` here: FastAPI reads the generated endpoints'
annotations at definition time, and they name per-module classes.
"""

import asyncio
import hmac
import inspect
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Form, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from runner import hardware, metrics
from runner.errors import ClientClosed, FieldError, RunnerError, Unauthorized, Unavailable
from runner.executor import as_runner_error
from runner.pipeline import error_statuses, is_multipart, operation_id, summary
from runner.protocol import (
    HardwareInformation,
    HardwareStats,
    HealthCheck,
    HTTPError,
    StreamChunk,
    Version,
)
from runner.service import Service
from runner.settings import Settings

log = logging.getLogger(__name__)
FORM_FIELD_BYTES = 8 << 20
DISCONNECT_POLL_SECONDS = 0.25
T = TypeVar("T")
ERROR_RESPONSES = {
    400: {"model": HTTPError, "description": "Bad Request"},
    401: {"model": HTTPError, "description": "Unauthorized"},
    413: {"model": HTTPError, "description": "Payload Too Large"},
    415: {"model": HTTPError, "description": "Unsupported Media Type"},
    500: {"model": HTTPError, "description": "Internal Server Error"},
    503: {"model": HTTPError, "description": "Service Unavailable"},
}


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
    return {path: frozenset({200, *error_statuses(module)})
            for module in service.modules.values() for path in with_slash(f"/{module.NAME}")}


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


def error_responses(module: types.ModuleType, settings: Settings) -> dict:
    """The error statuses a generate route documents: what it can answer with."""
    if settings.error_statuses == "http":
        return ERROR_RESPONSES
    return {s: ERROR_RESPONSES[s] for s in error_statuses(module) if s in ERROR_RESPONSES}


def generate_router(service: Service, settings: Settings) -> APIRouter:
    # Form fields may carry JSON arrays (SAM2's 1x256x256 mask_input is ~1.5 MB as Go writes
    # it), past Starlette's 1 MiB default per field; the body cap still bounds the total.
    router = APIRouter(tags=["generate"], dependencies=[Depends(bearer_auth(settings.auth_token))],
                       form_limits={"max_part_size": FORM_FIELD_BYTES})
    for module in service.modules.values():
        add_generate_route(router, module, service, error_responses(module, settings))
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


def add_generate_route(router: APIRouter, module: types.ModuleType, service: Service,
                       responses: dict) -> None:
    Request = module.Request

    async def respond(request: BaseModel, response: Response, http: HTTPRequest):
        try:
            if getattr(request, "stream", False) and hasattr(module, "stream"):
                result = await stream_events(service, module, request)
            else:
                timings: dict[str, float] = {}
                result = await until_disconnect(http, service.generate(module, request,
                                                                       timings))
                response.headers["Server-Timing"] = server_timing(timings)
        except RunnerError as exc:
            metrics.REQUESTS.labels(module.NAME, str(exc.status_code)).inc()
            raise
        except Exception:
            metrics.REQUESTS.labels(module.NAME, "500").inc()
            raise
        metrics.REQUESTS.labels(module.NAME, "200").inc()
        return result

    if is_multipart(Request):
        async def endpoint(request: Annotated[Request, Form(media_type="multipart/form-data")],
                           response: Response, http: HTTPRequest) -> BaseModel:
            return await respond(request, response, http)
    else:
        async def endpoint(request: Request, response: Response,
                           http: HTTPRequest) -> BaseModel:
            return await respond(request, response, http)

    options = dict(
        methods=["POST"], response_model=module.Response, responses=responses,
        summary=summary(module), description=inspect.getdoc(module).split("\n\n")[0],
    )
    add_route(router, f"/{module.NAME}", endpoint, operation_id(module), **options)


def failure_chunk(last: StreamChunk, exc: RunnerError) -> str:
    """The contract's way to end a failed stream: go-livepeer reads Choices[0] of every chunk
    (a chunk without one panics it), so no bare error object, but a last chunk with
    finish_reason "error"; the reason is in the runner's log."""
    return last.failure().model_dump_json(exclude_none=True)


async def stream_events(service: Service, module: types.ModuleType, request: BaseModel,
                        adapt: Callable[[AsyncIterator[BaseModel]], AsyncIterator[BaseModel]]
                        | None = None,
                        failed: Callable[[Any, RunnerError], str] = failure_chunk,
                        ping: float = 0) -> EventSourceResponse:
    """Server-sent events: `data: <chunk json>` per chunk, then `data: [DONE]`. The session is
    opened first, so unknown models, full queues and the like keep their status codes; an
    error after the first chunk is sent as the event `failed` makes of the last chunk. A
    client that goes away cancels the generator, which stops the backend and frees the lane.
    `adapt` rewrites the module's chunks into another wire format (the OpenAI layer's). No
    `: ping` comments unless asked for (`ping` seconds): go-livepeer logs every line that is
    not `data: ...` as a decode error."""
    stack = AsyncExitStack()
    session = await stack.enter_async_context(service.session(module, request))
    chunks = service.stream(module, session)
    chunks = adapt(chunks) if adapt else chunks
    try:  # a stream that fails before its first chunk still gets its own status code
        first = await anext(chunks, None)
    except Exception as exc:
        await stack.aclose()
        error = as_runner_error(exc)
        if error is exc:
            raise
        raise error from exc
    except BaseException:
        await stack.aclose()
        raise

    async def events():
        last = first
        try:
            if first is not None:
                yield {"data": first.model_dump_json(exclude_none=True)}
                async for last in chunks:
                    yield {"data": last.model_dump_json(exclude_none=True)}
        except Exception as exc:  # the stream has started: end it in-band, log why
            error = as_runner_error(exc)
            log.error("stream of %s failed after it started: %s", module.NAME, error.msg,
                      exc_info=exc if error is not exc else None)
            yield {"data": failed(last, error)}
        finally:
            await stack.aclose()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), sep="\n", ping=ping)


def json_paths(service: Service) -> set[str]:
    """Paths of the generate routes whose body is JSON, with their trailing-slash aliases."""
    names = [m.NAME for m in service.modules.values() if not is_multipart(m.Request)]
    return {path for name in names for path in with_slash(f"/{name}")}


def server_timing(timings: dict[str, float]) -> str:
    """`model;dur=1.2, denoise;dur=830.0, ...` in milliseconds (RFC Server-Timing)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timings.items())


def status_router(service: Service, settings: Settings) -> APIRouter:
    router = APIRouter()

    def default_model_id() -> str:
        if settings.model_id:
            return settings.model_id
        return ",".join(service.registry.default(name).id for name in service.modules)

    async def health() -> HealthCheck:
        return HealthCheck(status=service.health)

    async def version() -> Version:
        return Version(pipeline=settings.pipeline, model_id=default_model_id(),
                       version=settings.version, mode=service.mode)

    def hardware_info() -> HardwareInformation:
        return HardwareInformation(pipeline=settings.pipeline, model_id=default_model_id(),
                                   gpu_info=hardware.gpu_info())

    def hardware_stats() -> HardwareStats:
        return HardwareStats(pipeline=settings.pipeline, model_id=default_model_id(),
                             gpu_stats=hardware.gpu_stats())

    for path, endpoint, model in (("/health", health, HealthCheck),
                                  ("/version", version, Version),
                                  ("/hardware/info", hardware_info, HardwareInformation),
                                  ("/hardware/stats", hardware_stats, HardwareStats)):
        add_route(router, path, endpoint, endpoint.__name__, methods=["GET"],
                  response_model=model)

    @router.get("/models", operation_id="models", include_in_schema=False)
    async def models() -> dict:
        """The cache's budget and models; `on_demand`: warm models the budget cannot keep
        pinned beside the others, loaded per request and swapped."""
        return {**service.cache.summary(), "on_demand": [e.id for e in service.on_demand()],
                "models": service.cache.describe()}

    return router


def models_router(service: Service, settings: Settings) -> APIRouter:
    """Operator control of the warm cache: load, pin or unload a listed model by id (ids
    contain '/', hence the path converter); `pipeline` picks among pipelines sharing an id."""
    router = APIRouter(prefix="/models", tags=["models"], include_in_schema=False,
                       dependencies=[Depends(bearer_auth(settings.auth_token))])

    def entry_for(model_id: str, pipeline: str):
        names = [pipeline] if pipeline else [
            n for n in service.modules if model_id in {e.id for e in service.registry.entries(n)}]
        if pipeline and pipeline not in service.modules:
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
            raise Unavailable(f"{entry.id} is serving requests; retry when they finish",
                              retry_after=1)
        return state(entry)

    return router


def install(app: FastAPI, service: Service, settings: Settings) -> None:
    from runner import openai

    app.include_router(status_router(service, settings))
    app.include_router(models_router(service, settings))
    app.include_router(generate_router(service, settings))
    for module in service.modules.values():
        if getattr(module, "OPENAI_CHAT", False):
            app.include_router(openai.router(service, module, bearer_auth(settings.auth_token)))
