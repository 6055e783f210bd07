"""Worker threads for inference: the event loop never runs a model.

Each model has a lane: at most `max_concurrency` runs at once, at most `max_queue` more waiting;
past that the request is refused at once with 503 and a Retry-After estimated from recent
service times, instead of piling up until go-livepeer's timeouts fire. Refusals are `Busy`:
counted and logged where they are answered (runner/backpressure.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from runner import metrics
from runner.errors import Busy, BusyReason, InferenceError, RunnerError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Lane:
    key: str
    concurrency: int
    model: str = ""  # its model's id, as metrics and the log name it (default: the key)
    limiter: anyio.Semaphore = field(init=False)
    pending: int = 0  # admitted: waiting or running
    mean_seconds: float = 1.0  # exponential average of service time

    def __post_init__(self) -> None:
        self.limiter = anyio.Semaphore(self.concurrency)
        self.model = self.model or self.key

    def retry_after(self) -> int:
        return max(1, math.ceil(self.mean_seconds * self.pending / self.concurrency))

    def record(self, seconds: float) -> None:
        self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * seconds


class Executor:
    def __init__(self, max_queue: int, threads: int = 8, max_total: int | None = None):
        self.max_queue = max_queue
        self.max_total = max_total
        self._lanes: dict[str, Lane] = {}
        self._threads = anyio.CapacityLimiter(threads)

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self._lanes.values())

    @asynccontextmanager
    async def admit(self, key: str, concurrency: int, model: str = "") -> AsyncIterator[Lane]:
        """A place in lane `key` (`model`: the id its busy answers are counted under)."""
        lane = self._lanes.setdefault(key, Lane(key, concurrency, model))
        if lane.pending >= lane.concurrency + self.max_queue:
            raise Busy(lane.model, BusyReason.QUEUE_FULL,
                       f"{key} has {lane.pending} requests queued; retry later",
                       retry_after=lane.retry_after())
        if self.max_total is not None and self.pending >= self.max_total:
            raise Busy(lane.model, BusyReason.RUNNER_FULL,
                       f"this runner has {self.pending} requests in hand; retry later",
                       retry_after=self._retry_after())
        lane.pending += 1
        metrics.QUEUE_DEPTH.labels(key).set(lane.pending)
        try:
            yield lane
        finally:
            lane.pending -= 1
            metrics.QUEUE_DEPTH.labels(key).set(lane.pending)

    def room(self, key: str, concurrency: int, idle: bool = False) -> int:
        """Requests `admit` would take now for lane `key` (`idle`: with nothing in hand)."""
        lane = self._lanes.get(key)
        pending = 0 if idle or lane is None else lane.pending
        free = concurrency + self.max_queue - pending
        if self.max_total is not None:
            free = min(free, self.max_total - (0 if idle else self.pending))
        return max(0, free)

    def _retry_after(self) -> int:
        busy = [lane.retry_after() for lane in self._lanes.values() if lane.pending]
        return min(busy, default=1)

    @asynccontextmanager
    async def turn(self, lane: Lane, deadline: float | None = None) -> AsyncIterator[None]:
        """The lane's permission to run, waited for until the request's deadline (then 503)."""
        queued = time.monotonic()
        timeout = math.inf if deadline is None else max(0.0, deadline - queued)
        with anyio.move_on_after(timeout) as scope:
            await lane.limiter.acquire()
        if scope.cancelled_caught:
            raise Busy(lane.model, BusyReason.DEADLINE,
                       f"{lane.key}: the request's queue deadline passed before its turn",
                       retry_after=lane.retry_after())
        started = time.monotonic()
        metrics.QUEUE_WAIT_SECONDS.labels(lane.key).observe(started - queued)
        try:
            yield
        finally:
            lane.limiter.release()
            lane.record(time.monotonic() - started)

    async def call(self, fn: Callable[..., T], *args: Any,
                   on_oom: Callable[[], Awaitable[Any] | Any] | None = None) -> T:
        """Run `fn` in a worker thread, with `retrying`'s OOM handling."""
        return await self.retrying(functools.partial(self.in_thread, fn, *args), on_oom)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)

    async def retrying(self, attempt: Callable[[], Awaitable[T]],
                       on_oom: Callable[[], Awaitable[Any] | Any] | None = None) -> T:
        """Await `attempt()`. A CUDA OOM awaits `on_oom` (free memory, evict idle models) and
        tries once more; a second OOM, like any model failure, is a 500."""
        try:
            return await attempt()
        except RunnerError:
            raise
        except Exception as exc:
            if is_oom(exc) and on_oom is not None:
                log.warning("out of memory; evicting idle models and retrying once")
                if inspect.isawaitable(freed := on_oom()):
                    await freed
                return await self.retrying(attempt)
            raise as_inference_error(exc) from exc


def is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


def as_runner_error(exc: Exception) -> RunnerError:
    """Errors the runner raised on purpose stay as they are; anything else is a model
    failure (500)."""
    return exc if isinstance(exc, RunnerError) else as_inference_error(exc)


def as_inference_error(exc: BaseException) -> InferenceError:
    """Model failures become 500s; a CUDA OOM frees what it can first."""
    if is_oom(exc):
        free_device_memory()
        return InferenceError("GPU out of memory while running the model; retry or lower the "
                              "request size")
    return InferenceError(f"inference failed: {type(exc).__name__}")


def free_device_memory() -> None:
    """After an OOM the failed run's tensors may hang on its traceback's cycles: collect them,
    then give the allocator's blocks back."""
    import gc

    from runner.device import empty_cache

    gc.collect()
    empty_cache()
