"""Typed errors and the handlers that put them on the wire.

Status codes are decided by exception type, never by reading message text. Every body uses the
contract's envelope `{"detail": {"msg": ...}}`, except 422, which keeps FastAPI's list shape
because the Go client decodes 422 bodies as `HTTPValidationError`.

A route may be read by a client that decodes only some statuses: go-livepeer's generated client
(`ai/worker/runner.gen.go`) turns any other status into a nil result that the orchestrator then
dereferences (go-livepeer#4026). `app.state.decodable` maps such a route's path to the statuses
its client decodes, and every answer on it is translated by `for_client` first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from runner.protocol import HTTPError

log = logging.getLogger(__name__)


class RunnerError(Exception):
    """Base of every error the runner answers with on purpose."""

    status_code = 500
    headers: dict[str, str] = {}

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg


class BadRequest(RunnerError):
    """The client sent something unusable: undecodable media, bad JSON in a field, bad LoRA."""

    status_code = 400


class Unauthorized(RunnerError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(RunnerError):
    status_code = 413


class UnsupportedMedia(RunnerError):
    status_code = 415


class InferenceError(RunnerError):
    """The model failed on a valid request."""

    status_code = 500


class ModelLoadError(RunnerError):
    """A listed model could not be loaded (missing files, broken checkpoint)."""

    status_code = 500


class ClientClosed(RunnerError):
    """The client went away before its answer: the run was stopped (nginx's 499; nobody is
    left to read it, but logs and metrics are)."""

    status_code = 499


class Unavailable(RunnerError):
    """Waiting would help: the runner is busy (`Busy`), or a backend it needs is down."""

    status_code = 503

    def __init__(self, msg: str, retry_after: int = 1):
        super().__init__(msg)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


class BusyReason(StrEnum):
    """Why a request was refused for now: the `reason` of `runner_rejected_total`."""

    QUEUE_FULL = "queue_full"  # its model's lane holds max_concurrency + MAX_QUEUE
    RUNNER_FULL = "runner_full"  # MAX_QUEUE_TOTAL requests in hand
    DEADLINE = "deadline"  # QUEUE_TIMEOUT passed while it waited for model, turn or memory
    NO_ROOM = "no_room"  # the device memory it needs is held by models in use
    IN_USE = "in_use"  # an unload asked of a model that is serving


class Busy(Unavailable):
    """Backpressure, not a failure: the runner is full for now and a retry after Retry-After
    will likely be served. Answered like any `Unavailable`, but counted and logged as normal
    operation (runner/backpressure.py), never at ERROR."""

    def __init__(self, model: str, reason: BusyReason, msg: str, retry_after: int = 1):
        super().__init__(msg, retry_after)
        self.model = model
        self.reason = reason


class FieldError(RunnerError):
    """A schema-level error found after parsing (unknown model_id, a request that can never
    fit); answered as 422 in FastAPI's list shape so the Go client can decode it."""

    status_code = 422

    def __init__(self, field: str, msg: str, type_: str = "value_error"):
        super().__init__(msg)
        self.field = field
        self.type = type_


# The error responses a route can document, by status (the OpenAPI schema's `responses`).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": HTTPError, "description": "Bad Request"},
    401: {"model": HTTPError, "description": "Unauthorized"},
    413: {"model": HTTPError, "description": "Payload Too Large"},
    415: {"model": HTTPError, "description": "Unsupported Media Type"},
    500: {"model": HTTPError, "description": "Internal Server Error"},
    503: {"model": HTTPError, "description": "Service Unavailable"},
}


def documented(statuses: tuple[int, ...], error_statuses: str
               ) -> dict[int | str, dict[str, Any]]:
    """What a generate route whose client decodes `statuses` documents it answers; every HTTP
    status where ERROR_STATUSES=http."""
    if error_statuses == "http":
        return ERROR_RESPONSES
    return {s: ERROR_RESPONSES[s] for s in statuses if s in ERROR_RESPONSES}


# What go-livepeer itself answers when no runner can take a job; its gateways retry elsewhere.
BUSY = "insufficient capacity"


def error_body(msg: str) -> dict:
    return {"detail": {"msg": msg}}


def for_client(status: int, msg: str, decodable: frozenset[int] | None) -> tuple[int, str]:
    """The status and message to answer with where the client decodes only `decodable` (None:
    any status): busy (503) becomes a 500 that says "insufficient capacity", any other status
    the client cannot read the nearest one it can, 400 for the client's mistakes (413, 415,
    422), 500 for ours."""
    if decodable is None or status in decodable:
        return status, msg
    if status == Unavailable.status_code:
        return 500, f"{BUSY}: {msg}"
    return (500 if status >= 500 else 400), msg


def decodable(request: Request) -> frozenset[int] | None:
    """The statuses the client of this request's route decodes; None where any will do."""
    return decodable_in(request.scope, getattr(request.app.state, "decodable", {}))


def decodable_in(scope: Mapping[str, Any],
                 table: dict[str, frozenset[int]]) -> frozenset[int] | None:
    """`table` (path -> statuses) for a request's scope: only POSTs have a restricted client."""
    return table.get(scope["path"]) if scope.get("method") == "POST" else None


def answer(request: Request, status: int, msg: str,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    status, msg = for_client(status, msg, decodable(request))
    return JSONResponse(error_body(msg), status_code=status, headers=headers)


def is_failure(exc: RunnerError) -> bool:
    """What an operator must act on (logged at ERROR): a 5xx that is not backpressure."""
    return exc.status_code >= 500 and not isinstance(exc, Busy)


def _runner_error(request: Request, exc: RunnerError,
                  on_busy: Callable[[Busy], None]) -> Response:
    """Busy answers go to `on_busy` (counted, logged at most now and then); a failure an
    operator must act on (5xx) is logged at ERROR; a client's mistake (4xx) is only its
    answer (and uvicorn's access line)."""
    if isinstance(exc, FieldError):
        return _validation_list(request, [{"loc": ["body", exc.field], "msg": exc.msg,
                                           "type": exc.type}])
    if isinstance(exc, Busy):
        on_busy(exc)
    elif is_failure(exc):
        log.error("%s: %s", type(exc).__name__, exc.msg, exc_info=exc.__cause__)
    return answer(request, exc.status_code, exc.msg, exc.headers)


def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _validation_list(request, list(exc.errors()))


def _validation_list(request: Request, items: list[dict]) -> Response:
    """422 in FastAPI's list shape, or, where the client cannot read a 422, a 400 whose
    message lists the same problems."""
    if 422 not in (decodable(request) or {422}):
        return answer(request, 422, "; ".join(
            f"{'.'.join(str(part) for part in item['loc'][1:]) or 'body'}: {item['msg']}"
            for item in items))
    try:
        return JSONResponse({"detail": jsonable_encoder(items)}, status_code=422)
    except ValueError:  # an input JSON cannot echo (NaN, a lone surrogate, non-UTF-8 bytes)
        detail = [{k: v for k, v in item.items() if k not in ("input", "ctx")} for item in items]
        return Response(json.dumps({"detail": jsonable_encoder(detail)}, ensure_ascii=True),
                        status_code=422, media_type="application/json")


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return answer(request, exc.status_code, str(exc.detail), exc.headers)


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("Internal server error"), status_code=500)


def install(app: FastAPI, on_busy: Callable[[Busy], None]) -> None:
    """The handlers for every error; each busy answer is also handed to `on_busy`."""

    def runner_error(request: Request, exc: RunnerError) -> Response:
        return _runner_error(request, exc, on_busy)

    # Starlette types every handler as taking any Exception, though it only ever passes one
    # the class it is registered for: a narrower parameter is the documented use.
    app.add_exception_handler(RunnerError, runner_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
