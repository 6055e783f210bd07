"""Connections that cannot hold the server: uvicorn's h11 protocol with a deadline for each
request's headers and a cap on open connections.

uvicorn waits for a new connection's first request for ever, and a request's headers may
trickle in a byte at a time: a few hundred such clients hold a file descriptor each for as
long as they like. Here a connection must deliver a request's whole head within
`header_timeout` seconds of opening (or of its previous answer), and once `max_connections`
are open the oldest one without a request in progress is closed to make room for the new one,
so whoever opens connections and sends nothing cannot keep /health (go-livepeer's health
check) out. A body that stalls is refused by runner.middleware.BodyLimit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class GuardedH11(H11Protocol):
    header_timeout = 10.0
    max_connections = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.opened = time.monotonic()
        self.head_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._wait_for_head()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_request():
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._wait_for_head()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _wait_for_head(self) -> None:
        self._cancel_deadline()
        self.head_deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        # getattr: the attribute exists only once connection_made has run.
        deadline: asyncio.TimerHandle | None = getattr(self, "head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self.head_deadline = None

    def _too_slow(self) -> None:
        if not self._in_request() and not self.transport.is_closing():
            log.debug("closing %s: no request head within %.0f s", self.client,
                      self.header_timeout)
            self.transport.close()

    def _make_room(self) -> None:
        """Over the cap, close the connections that have been waiting longest without a
        request in progress (never one whose request is being served)."""
        idle = sorted((c for c in self.connections if isinstance(c, GuardedH11)
                       and c is not self and not c._in_request()
                       and not c.transport.is_closing()), key=lambda c: c.opened)
        for conn in idle[:max(0, len(self.connections) - self.max_connections)]:
            conn.transport.close()


def protocol(header_timeout: float, max_connections: int) -> type[Any]:
    """The protocol class uvicorn's `http=` takes, with these limits."""
    return type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout,
                                               "max_connections": max_connections})
