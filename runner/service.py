"""The request path: a request resolves to its model, waits for its lane and its working
memory, runs, and gives everything back. Models themselves are runner/lifecycle.py's."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from runner import metrics
from runner.cache import ModelCache, Reservation
from runner.context import RunContext
from runner.device import Device
from runner.executor import Executor, Lane
from runner.lifecycle import Models
from runner.middleware import Count
from runner.registry import ModelEntry, Registry
from runner.settings import Settings
from runner.spec import PipelineSpec, rewind_uploads, with_defaults

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Session:
    """A request admitted to its model's lane, with its model (and checker) in hand."""

    lane: Lane
    model: Any
    request: BaseModel
    ctx: RunContext
    deadline: float | None = None


class Service:
    def __init__(self, settings: Settings, registry: Registry, specs: dict[str, PipelineSpec]):
        self.settings = settings
        self.registry = registry
        self.specs = specs
        self.models = Models(settings, registry, specs)
        self.in_flight = Count()  # requests in hand, counted by the InFlight middleware
        self.draining = False  # SIGTERM: finishing what is in hand, taking nothing new
        self.on_drain: list[Callable[[], Awaitable[None]]] = []
        self.drained = asyncio.Event()  # set once the on_drain hooks have run
        # Enough worker threads for every lane to run at its limit at once, so one busy
        # pipeline cannot take the threads another pipeline's requests need.
        lanes = sum(e.max_concurrency for name in specs for e in registry.entries(name))
        self.executor = Executor(settings.max_queue, threads=max(8, lanes + 1),
                                 max_total=settings.max_queue_total)

    # What routes, tests and operators read of the models, in one place.
    @property
    def cache(self) -> ModelCache:
        return self.models.cache

    @property
    def device(self) -> Device:
        return self.models.device

    @property
    def tiny(self) -> bool:
        return self.models.tiny

    @property
    def model_dir(self) -> Path:
        return self.models.model_dir

    @property
    def mode(self) -> str:
        return self.models.mode

    @property
    def health(self) -> str:
        """LOADING until the warm models serve, ERROR while one cannot; then OK while a request
        (or a warm-up) is in hand and IDLE when none is: go-livepeer returns a warm container
        it borrowed while it said LOADING to its pool only on IDLE, and never on OK."""
        if self.models.state != "READY":
            return self.models.state
        return "OK" if self.in_flight.value or self.executor.pending else "IDLE"

    def room(self, name: str, idle: bool = False) -> int:
        """Requests pipeline `name`'s default model would take now without a busy answer
        (`idle`: the most it takes); 0 while the warm models are not served."""
        if not idle and self.models.state != "READY":
            return 0
        entry = self.registry.default(name)
        return self.executor.room(ModelCache.key(entry), entry.max_concurrency, idle)

    def file_problems(self) -> dict[str, list[str]]:
        return self.models.file_problems()

    def budget_problems(self) -> dict[str, str]:
        return self.models.budget_problems()

    def on_demand(self) -> list[ModelEntry]:
        return self.models.on_demand()

    def default_requests(self) -> dict[str, dict[str, int | str]]:
        """Per served pipeline: its default model and the working memory admission reserves
        now for a default-sized request of it (the estimate, corrected by measured peaks)."""
        return {name: {"model": self.registry.default(name).id,
                       "reserved_bytes": self.models.default_reserve(name)}
                for name in self.specs}

    @property
    def ready(self) -> bool:
        """Serving: the warm models are, and no SIGTERM has begun draining (GET /ready)."""
        return not self.draining and self.health in ("IDLE", "OK")

    async def drain(self) -> None:
        """Take nothing new: /ready turns 503 and each `on_drain` hook runs, once. A later call
        (the lifespan's, after SIGTERM began draining) waits for those hooks to finish, so the
        process never exits with a Live Runner unregister still in flight."""
        if self.draining:
            await self.drained.wait()
            return
        self.draining = True
        try:
            for hook in self.on_drain:
                try:
                    await hook()
                except Exception as exc:  # noqa: BLE001  draining goes on whatever a hook does
                    log.warning("a drain hook failed: %s", exc)
        finally:
            self.drained.set()

    async def warm_up(self) -> None:
        await self.models.warm_up(self.executor)

    async def close(self) -> None:
        await self.models.close()

    # -- one request ------------------------------------------------------------------------

    @asynccontextmanager
    async def session(self, spec: PipelineSpec, request: BaseModel,
                      timings: dict[str, float] | None = None) -> AsyncIterator[Session]:
        """A request's place in its model's lane, its model (loaded if cold) and the safety
        checker when asked for; everything a client can get wrong fails here, before any
        response byte is sent."""
        entry = self.registry.resolve(spec.name, spec.model_id(request))
        request = with_defaults(request, entry)
        timings = {} if timings is None else timings
        started = time.perf_counter()
        timeout = self.settings.queue_timeout
        deadline = time.monotonic() + timeout if timeout > 0 else None
        async with AsyncExitStack() as stack:
            lane = await stack.enter_async_context(
                self.executor.admit(ModelCache.key(entry), entry.max_concurrency,
                                    entry.id))
            model = await stack.enter_async_context(self.cache.use(entry, deadline))
            checker = None
            if spec.wants_safety_check(request):
                checker = await stack.enter_async_context(
                    self.cache.use(self.registry.safety_checker, deadline))
            timings["model"] = time.perf_counter() - started
            ctx = RunContext(entry, self.device, self.models.files(entry), self.settings,
                             checker, timings)
            yield Session(lane, model, request, ctx, deadline)

    async def generate(self, spec: PipelineSpec, request: BaseModel,
                       timings: dict[str, float] | None = None) -> BaseModel:
        async with self.session(spec, request, timings) as s:
            with metrics.INFERENCE_SECONDS.labels(spec.name, s.ctx.entry.id).time():
                async with self.executor.turn(s.lane, s.deadline):
                    return await self._run_in_memory(spec, s)

    async def _run_in_memory(self, spec: PipelineSpec, s: Session) -> BaseModel:
        """Run with the working memory the request's size needs reserved on the device; the
        peak it really used corrects the next estimate of that size. A coroutine `run` (one
        that waits on a daemon, or hands its own threads the work) takes the same reservation
        and OOM retry, on the event loop."""
        entry = s.ctx.entry
        hint = spec.largest_fitting
        async with self.cache.reserve(
                entry, self.models.working_memory(spec, entry, s.request), s.deadline,
                hint=hint and functools.partial(hint, entry, s.request)) as reserved:
            async def on_oom() -> None:
                self.cache.oom(entry, reserved)
                await self.cache.evict_idle()

            attempt = self._attempt(spec, s, reserved)
            if spec.run_is_async:
                return await self.executor.retrying(attempt, on_oom)
            return await stop_on_cancel(self.executor.retrying(attempt, on_oom), s.ctx)

    def _attempt(self, spec: PipelineSpec, s: Session, reserved: Reservation
                 ) -> Callable[[], Awaitable[BaseModel]]:
        """One try of the run, measuring its peak; a retry after an OOM calls it again."""
        memory = self.models.memory

        def in_thread() -> BaseModel:
            rewind_uploads(s.request)  # a retry after an OOM reads them again
            result, reserved.peak = memory.measured(spec.run, s.model, s.request, s.ctx)
            return result

        async def on_loop() -> BaseModel:
            result, reserved.peak = await memory.measured_async(spec.run, s.model, s.request,
                                                                s.ctx)
            return result

        if spec.run_is_async:
            return on_loop
        return functools.partial(self.executor.in_thread, in_thread)

    async def stream(self, spec: PipelineSpec, s: Session) -> AsyncIterator[BaseModel]:
        """The pipeline's chunks for an open session, holding the lane slot and its working
        memory to the end (a reservation also tells other runs their peaks are shared)."""
        assert spec.stream is not None  # routes stream only pipelines that can
        entry = s.ctx.entry
        async with self.executor.turn(s.lane, s.deadline), self.cache.reserve(
                entry, self.models.working_memory(spec, entry, s.request), s.deadline):
            async for chunk in spec.stream(s.model, s.request, s.ctx):
                yield chunk


async def stop_on_cancel(work: Awaitable[T], ctx: RunContext) -> T:
    """A worker thread cannot be interrupted: when the request is cancelled (its client went
    away), flag the run so it stops at its next step, and hold the request's lane and memory
    until the thread has really finished."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        ctx.cancelled.set()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the ClientClosed it most likely ended with
        raise

