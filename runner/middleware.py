"""ASGI middleware: a body-size cap enforced before any parsing."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.errors import PayloadTooLarge, error_body


class BodyLimit:
    """413 for bodies over `max_bytes`: at once from Content-Length, or as soon as a chunked
    body passes the cap, so a huge upload is never buffered or spooled to disk."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes / 2**20:.3g} MiB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Re-raised untouched by FastAPI's body parsing, then answered as 413.
                raise HTTPException(PayloadTooLarge.status_code, self._message())
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Send) -> None:
        import json

        body = json.dumps(error_body(self._message())).encode()
        await send({"type": "http.response.start", "status": PayloadTooLarge.status_code,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class JsonBodies:
    """On routes whose body is JSON, a body sent without a content type or as
    `application/x-www-form-urlencoded` (what `curl -d` sends) is read as JSON; anything not
    JSON still gets the usual 422."""

    LENIENT = {b"", b"application/x-www-form-urlencoded"}

    def __init__(self, app: ASGIApp, paths: set[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = dict(scope["headers"]).get(b"content-type", b"")
            if declared.split(b";")[0].strip().lower() in self.LENIENT:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
