"""Typed errors and the handlers that put them on the wire.

Status codes are decided by exception type, never by reading message text. Every body uses the
contract's envelope `{"detail": {"msg": ...}}`, except 422, which keeps FastAPI's list shape
because the Go client decodes 422 bodies as `HTTPValidationError`.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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
    """Waiting would help: queue full, model cannot fit right now."""

    status_code = 503

    def __init__(self, msg: str, retry_after: int = 1):
        super().__init__(msg)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


class FieldError(RunnerError):
    """A schema-level error found after parsing (unknown model_id, a request that can never
    fit); answered as 422 in FastAPI's list shape so the Go client can decode it."""

    status_code = 422

    def __init__(self, field: str, msg: str, type_: str = "value_error"):
        super().__init__(msg)
        self.field = field
        self.type = type_


def error_body(msg: str) -> dict:
    return {"detail": {"msg": msg}}


def _runner_error(_: Request, exc: RunnerError) -> JSONResponse:
    if isinstance(exc, FieldError):
        detail = [{"loc": ["body", exc.field], "msg": exc.msg, "type": exc.type}]
        return JSONResponse({"detail": detail}, status_code=422)
    if exc.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc.msg, exc_info=exc.__cause__)
    return JSONResponse(error_body(exc.msg), status_code=exc.status_code, headers=exc.headers)


def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    try:
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
    except ValueError:  # an input JSON cannot echo (NaN, a lone surrogate, non-UTF-8 bytes)
        detail = [{k: v for k, v in item.items() if k not in ("input", "ctx")}
                  for item in exc.errors()]
        return Response(json.dumps({"detail": jsonable_encoder(detail)}, ensure_ascii=True),
                        status_code=422, media_type="application/json")


def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(
        error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("Internal server error"), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RunnerError, _runner_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
