"""ASGI middleware: a body-size cap enforced before any parsing, the count of requests in
flight, lenient JSON content types."""

from __future__ import annotations

import json
from dataclasses import dataclass

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.errors import PayloadTooLarge, decodable_in, error_body, for_client


class BodyLimit:
    """413 for bodies over `max_bytes`: at once from Content-Length, or as soon as a chunked
    body passes the cap, so a huge upload is never buffered or spooled to disk; 408 for a body
    that stalls, `stall_seconds` without a byte, so a trickling client cannot hold a request
    open. Where the route's client cannot decode the status (`decodable`, as in errors.py) it
    is that client's 400.

    A refusal from Content-Length is answered at once, then the body the client goes on
    sending is read and thrown away (`drain_bytes` at most, for `drain_seconds` at most)
    before the connection closes: closed with unread data, the kernel resets it, and a client
    that writes its whole body before reading (go-livepeer's) gets `connection reset by peer`
    instead of the answer."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 decodable: dict[str, frozenset[int]] | None = None,
                 stall_seconds: float = 0, drain_bytes: int = 0, drain_seconds: float = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.decodable = decodable or {}
        self.stall_seconds = stall_seconds
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds

    def _message(self) -> str:
        return f"request body is larger than the limit of {self.max_bytes / 2**20:.3g} MiB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, int(declared))
            return
        received, whole = 0, False

        async def limited() -> Message:
            nonlocal received, whole
            message = await self._next(receive, whole)
            whole = whole or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Re-raised untouched by FastAPI's body parsing, then answered as 413.
                raise HTTPException(PayloadTooLarge.status_code, self._message())
            return message

        await self.app(scope, limited, send)

    async def _next(self, receive: Receive, whole: bool) -> Message:
        """The next message; while the body is still coming, within `stall_seconds`."""
        if whole or not self.stall_seconds:
            return await receive()
        with anyio.move_on_after(self.stall_seconds):
            return await receive()
        raise HTTPException(408, f"the request body stalled: no data for "
                                 f"{self.stall_seconds:g} s")

    async def _reject(self, scope: Scope, receive: Receive, send: Send, declared: int) -> None:
        """The refusal, whole (its Content-Length's worth) before the body is drained; the
        response ends, and uvicorn closes the connection, only once the drain is over."""
        status, msg = for_client(PayloadTooLarge.status_code, self._message(),
                                 decodable_in(scope, self.decodable))
        body = json.dumps(error_body(msg)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await self._drain(receive, min(declared, self.drain_bytes))
        await send({"type": "http.response.body", "body": b""})

    async def _drain(self, receive: Receive, limit: int) -> None:
        """Reads and discards up to `limit` body bytes within `drain_seconds`; stops early
        when the body ends or the client goes away."""
        drained = 0
        with anyio.move_on_after(self.drain_seconds):
            while drained < limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


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


@dataclass
class Count:
    value: int = 0


class InFlight:
    """Counts POST requests from their first byte to their last (a stream's last chunk too):
    /health says OK while any is in hand and IDLE when none is, and go-livepeer hands a
    borrowed container back to its pool only on IDLE."""

    def __init__(self, app: ASGIApp, count: Count):
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.count.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count.value -= 1
