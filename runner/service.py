"""The service behind the routes: resolves a request to a model, queues it, runs it."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import time
import types
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from filelock import FileLock
from pydantic import BaseModel

from runner import checkpoints, footprint, hardware, metrics, safety, warm
from runner import device as devices
from runner.cache import Loader, ModelCache
from runner.context import RunContext
from runner.errors import ModelLoadError, RunnerError
from runner.executor import Executor, Lane
from runner.hub import ModelFiles
from runner.memory import CudaMemory, HostMemory
from runner.middleware import Count
from runner.pipeline import rewind_uploads, with_defaults
from runner.registry import ModelEntry, Registry
from runner.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class Service:
    def __init__(self, settings: Settings, registry: Registry,
                 modules: dict[str, types.ModuleType]):
        self.settings = settings
        self.registry = registry
        self.modules = modules
        self.device = devices.resolve(settings.device, settings.torch_compile)
        auto_tiny = settings.device == "auto" and not self.device.is_cuda
        self.tiny = auto_tiny if settings.tiny is None else settings.tiny
        self.model_dir = Path(settings.tiny_dir if self.tiny else settings.model_dir)
        if settings.torch_compile:
            # Compiled kernels persist beside the weights: the next start reuses them.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                  str(self.model_dir / ".cache" / "torchinductor"))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        self.state = "LOADING"  # LOADING | READY | ERROR
        self.in_flight = Count()  # requests in hand, counted by the InFlight middleware
        self._deferred: list[ModelEntry] = []  # warm models whose compile waits for READY
        self.warm_plan: warm.WarmPlan | None = None  # which warm models are pinned
        self.memory = CudaMemory(self.device.index) if self.device.is_cuda else HostMemory()
        self.cache = ModelCache(
            Loader(load=self._load, estimate=self._estimate, measure=footprint.measure,
                   release=devices.empty_cache, unload=unload_model, move=self._move,
                   movable=devices.movable, external=devices.held_elsewhere),
            budget=self._budget(), host_budget=self._host_budget(), memory=self.memory,
        )
        # Enough worker threads for every lane to run at its limit at once, so one busy
        # pipeline cannot take the threads another pipeline's requests need.
        lanes = sum(e.max_concurrency for name in modules for e in registry.entries(name))
        self.executor = Executor(settings.max_queue, threads=max(8, lanes + 1),
                                 max_total=settings.max_queue_total)

    @property
    def health(self) -> str:
        """LOADING until the warm models serve, ERROR while one cannot; then OK while a request
        (or a warm-up) is in hand and IDLE when none is: go-livepeer returns a warm container
        it borrowed while it said LOADING to its pool only on IDLE, and never on OK."""
        if self.state != "READY":
            return self.state
        return "OK" if self.in_flight.value or self.executor.pending else "IDLE"

    @property
    def mode(self) -> str:
        return "tiny" if self.tiny else "gpu" if self.device.is_cuda else "cpu"

    def _module(self, entry: ModelEntry) -> Any:
        return safety if entry.pipeline == "safety" else self.modules[entry.pipeline]

    def _files(self, entry: ModelEntry) -> ModelFiles:
        return ModelFiles(self.model_dir, entry.id)

    def _estimate(self, entry: ModelEntry) -> int:
        if self.tiny:
            self._build_tiny(entry)
        float_bytes = self._float_bytes(entry)
        # A module may know better (llm: a model an Ollama daemon holds has no weights here).
        own = getattr(self._module(entry), "estimate", None)
        if own is not None and (size := own(entry, self._files(entry), float_bytes)) is not None:
            return size
        return footprint.estimate(entry, self._files(entry), float_bytes)

    def _load(self, entry: ModelEntry) -> Any:
        module = self._module(entry)
        if problems := self._entry_problems(entry):  # an interrupted download: say which file
            raise ModelLoadError(
                f"the files of {entry.id} in {self.model_dir} are missing or broken: "
                f"{'; '.join(problems)}; fetch them again with "
                f"`{checkpoints.fetch_command([entry.id], self.model_dir)}`")
        model = module.load(entry, self._files(entry), self.device)
        if self._compiles(module):
            if self.state == "LOADING" and entry in self.pinned():
                self._deferred.append(entry)  # after READY: see _compile_deferred
            else:  # a model loaded for a request: compiled before that request runs
                self._compile(module, model, entry)
        return model

    def _compiles(self, module: Any) -> bool:
        return self.device.compile and getattr(module, "warm_up", None) is not None

    def _compile(self, module: Any, model: Any, entry: ModelEntry) -> None:
        """TORCH_COMPILE: one warm-up run at the served sizes compiles the model, so no client
        request pays for it."""
        started = time.perf_counter()
        module.warm_up(model, entry)
        log.info("compiled %s for its served sizes in %.1fs", entry.id,
                 time.perf_counter() - started)

    async def _compile_deferred(self) -> None:
        """The warm models' compiles run once /health has left LOADING, since go-livepeer
        counts LOADING past 3 minutes as failures and compiling SDXL can take longer. Each runs
        in its model's lane like a request: /health says OK until it is done (so a warm
        container stays out of go-livepeer's pool until then), and requests wait behind it
        instead of compiling too."""
        while self._deferred:
            entry = self._deferred.pop(0)
            module, key = self._module(entry), ModelCache.key(entry)
            try:
                async with self.executor.admit(key, entry.max_concurrency) as lane:
                    async with self.executor.turn(lane), self.cache.use(entry) as model:
                        await self.executor.call(self._compile, module, model, entry)
            except Exception as exc:  # the model still serves, uncompiled where it failed
                log.error("compiling %s failed: %s", entry.id, exc, exc_info=exc)

    def _move(self, entry: ModelEntry, model: Any, tier: str) -> None:
        """Between the device and CPU RAM; a module may know better (a cache to drop)."""
        target = self.device.torch if tier == "device" else "cpu"
        own = getattr(self._module(entry), "move", None)
        (own or devices.move_model)(model, target)

    def _build_tiny(self, entry: ModelEntry) -> None:
        """Tiny checkpoints are written once, when the entry's files are missing; the file lock
        keeps two processes sharing TINY_DIR from writing the same folder at once."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.model_dir / ".build.lock")):
            if not self._files(entry).present(entry.sources()):
                log.info("tiny mode: writing a random-weight %s for %s", entry.kind, entry.id)
                self._module(entry).build_tiny(entry, self.model_dir)

    def _budget(self) -> int:
        """VRAM_BUDGET, or the device total minus the reserve. Known before any request:
        NVML answers without importing torch (about torch's cuda:index, CUDA_VISIBLE_DEVICES
        and MIG included)."""
        if self.settings.vram_budget is not None:
            return int(self.settings.vram_budget)
        total = None
        if self.device.is_cuda:
            total = hardware.gpu_total(self.device.index) or devices.cuda_total(self.device.index)
        if total is None:
            import psutil

            total = psutil.virtual_memory().total
        return max(0, total - int(self.settings.vram_reserve))

    def _host_budget(self) -> int:
        if self.settings.host_budget is not None:
            return int(self.settings.host_budget)
        if not self.device.is_cuda:
            return 0
        import psutil

        return psutil.virtual_memory().available // 2

    def _needs_safety(self) -> bool:
        return any("safety_check" in m.Request.model_fields for m in self.modules.values())

    def pinned(self) -> list[ModelEntry]:
        return self.warm_plan.pinned if self.warm_plan is not None else []

    def on_demand(self) -> list[ModelEntry]:
        return self.warm_plan.on_demand if self.warm_plan is not None else []

    def _warm_entries(self) -> list[ModelEntry]:
        warm = [self.registry.default(name) for name in self.modules]
        return warm + ([self.registry.safety_checker] if self._needs_safety() else [])

    async def _serving(self) -> bool:
        """Every pinned warm model resident (loading any that are not) and, for modules with
        a `health(model)` hook (a daemon that may go away), healthy."""
        if self.warm_plan is None:
            self.warm_plan = await self._plan_warm()
        for entry in self.warm_plan.pinned:
            await self.cache.pin(entry)
        for name, module in self.modules.items():
            hook = getattr(module, "health", None)
            model = self.cache.resident(self.registry.default(name))
            if hook is not None and model is not None and not await hook(model):
                return False
        return True

    async def _plan_warm(self) -> warm.WarmPlan:
        """Pin the warm models the budget can hold while the others are still served on
        demand (runner/warm.py); a warm model bigger than the whole budget is an error."""
        sizes = {e.id: await anyio.to_thread.run_sync(self._estimate, e)
                 for e in self._warm_entries()}
        plan = self._fit(sizes)
        if plan.too_large:
            raise ModelLoadError(self._too_large(plan.too_large, sizes))
        if plan.on_demand:
            log.warning("the budget (%d MiB) cannot hold every warm model: %s pinned, %s loaded "
                        "on demand and swapped (slower: each swap is a load)",
                        self.cache.budget >> 20, ", ".join(e.id for e in plan.pinned) or "none",
                        ", ".join(e.id for e in plan.on_demand))
        return plan

    def _fit(self, sizes: dict[str, int]) -> warm.WarmPlan:
        """The warm plan for these model sizes against the budget as it is now."""
        entries = self._warm_entries()
        companion = self.registry.safety_checker if self._needs_safety() else None
        runs = max((self._default_run_bytes(e) for e in entries), default=0)
        self.cache.refresh()
        return warm.plan(entries, sizes, self.cache.budget, companion, runs)

    def _default_run_bytes(self, entry: ModelEntry) -> int:
        """The working memory of a request that leaves every field to the model's defaults
        (an upload's size unknown: 0 for the parts that follow it)."""
        module = self._module(entry)
        if not hasattr(module, "Request"):  # the safety checker: it runs inside others' runs
            return 0
        try:
            return self.working_memory(module, entry, module.Request.model_construct(
                **{**entry.defaults, **entry.fixed}))
        except Exception:  # noqa: BLE001  a module whose estimate needs what a sample lacks
            return 0

    def _too_large(self, entries: list[ModelEntry], sizes: dict[str, int]) -> str:
        return "; ".join(
            f"{e.id} needs about {sizes[e.id] >> 20} MiB, more than this runner's whole budget "
            f"of {self.cache.budget >> 20} MiB (VRAM_BUDGET, or the device's memory minus "
            "VRAM_RESERVE)" for e in entries)

    async def warm_up(self) -> None:
        """Load and pin every served pipeline's default model (and the safety checker), or
        those the budget can hold beside the others' turns: /health says LOADING until they
        are resident, ERROR if one failed. Then keep
        checking every HEALTH_PROBE_SECONDS: a warm model that failed is retried, and a daemon
        that went away (or came back) shows in /health."""
        if self.device.is_cuda:
            await anyio.to_thread.run_sync(devices.configure_for_cuda)
        if self.tiny:
            await anyio.to_thread.run_sync(devices.configure_for_tiny)
        while True:
            await self._probe()
            await self._compile_deferred()
            if self.settings.health_probe_seconds <= 0:
                return
            await asyncio.sleep(self.settings.health_probe_seconds)
            await self.cache.rebalance()

    async def _probe(self) -> None:
        try:
            healthy = await self._serving()
        except Exception as exc:
            if self.state != "ERROR":
                log.exception("warm model unavailable; /health reports ERROR", exc_info=exc)
            self.state = "ERROR"
            return
        if healthy and self.state != "READY":
            log.info("ready (%s mode): %s", self.mode,
                     ", ".join(e.id for e in self._warm_entries()))
        elif not healthy and self.state != "ERROR":
            log.error("a warm model's backend is unhealthy; /health reports ERROR")
        self.state = "READY" if healthy else "ERROR"

    def file_problems(self) -> dict[str, list[str]]:
        """What the warm models' files lack, read from disk without loading anything; checked
        before the port is bound, so a runner that could never serve exits once with the
        download command instead of reporting ERROR, which go-livepeer answers by re-creating
        the container for ever. Tiny mode writes its own files, so nothing is missing there."""
        if self.tiny:
            return {}
        found = {}
        for entry in self._warm_entries():
            if problems := self._entry_problems(entry):
                found[entry.id] = problems
        if not found:  # whole files: each must also fit the budget on its own
            sizes = {e.id: self._estimate(e) for e in self._warm_entries()}
            for entry in self._fit(sizes).too_large:
                found[entry.id] = [self._too_large([entry], sizes)]
        return found

    def _entry_problems(self, entry: ModelEntry) -> list[str]:
        """What `entry`'s files lack (runner/checkpoints.py, or the module's own check);
        nothing in tiny mode, which writes its own files."""
        if self.tiny:
            return []
        own = getattr(self._module(entry), "file_problems", None)
        try:
            problems = own(entry, self._files(entry)) if own is not None else None
        except RunnerError as exc:  # e.g. a backend setting that names nothing
            return [exc.msg]
        return checkpoints.entry_problems(entry, self.model_dir) if problems is None \
            else problems

    async def close(self) -> None:
        """At shutdown, after in-flight requests: give every model's memory back (a daemon's
        too, which would otherwise keep it after this process is gone)."""
        await self.cache.close()

    @asynccontextmanager
    async def session(self, module: types.ModuleType, request: BaseModel,
                      timings: dict[str, float] | None = None) -> AsyncIterator[Session]:
        """A request's place in its model's lane, its model (loaded if cold) and the safety
        checker when asked for; everything a client can get wrong fails here, before any
        response byte is sent."""
        entry = self.registry.resolve(module.NAME, getattr(request, "model_id", "") or "")
        request = with_defaults(request, entry)
        timings = {} if timings is None else timings
        started = time.perf_counter()
        timeout = self.settings.queue_timeout
        deadline = time.monotonic() + timeout if timeout > 0 else None
        async with AsyncExitStack() as stack:
            lane = await stack.enter_async_context(
                self.executor.admit(ModelCache.key(entry), entry.max_concurrency))
            model = await stack.enter_async_context(self.cache.use(entry, deadline))
            checker = None
            if getattr(request, "safety_check", False):
                checker = await stack.enter_async_context(
                    self.cache.use(self.registry.safety_checker, deadline))
            timings["model"] = time.perf_counter() - started
            ctx = RunContext(entry, self.device, self._files(entry), self.settings, checker,
                             timings)
            yield Session(lane, model, request, ctx, deadline)

    async def generate(self, module: types.ModuleType, request: BaseModel,
                       timings: dict[str, float] | None = None) -> BaseModel:
        async with self.session(module, request, timings) as s:
            with metrics.INFERENCE_SECONDS.labels(module.NAME, s.ctx.entry.id).time():
                if inspect.iscoroutinefunction(module.run):  # waits on a daemon: no thread
                    return await self.executor.run_async(s.lane, module.run, s.model,
                                                          s.request, s.ctx, deadline=s.deadline)
                async with self.executor.turn(s.lane, s.deadline):
                    return await self._run_in_memory(module, s)

    async def _run_in_memory(self, module: types.ModuleType, s: Session) -> BaseModel:
        """Run with the working memory the request's size needs reserved on the device; the
        peak it really used corrects the next estimate of that size."""
        entry = s.ctx.entry
        estimate = self.working_memory(module, entry, s.request)
        hint = getattr(module, "largest_fitting", None)
        async with self.cache.reserve(
                entry, estimate, s.deadline,
                hint=hint and functools.partial(hint, entry, s.request)) as reserved:
            def run() -> BaseModel:
                rewind_uploads(s.request)  # a retry after an OOM reads them again
                result, reserved.peak = self.memory.measured(module.run, s.model, s.request,
                                                             s.ctx)
                return result

            async def on_oom() -> None:
                self.cache.oom(entry, reserved)
                await self.cache.evict_idle()

            return await stop_on_cancel(self.executor.call(run, on_oom=on_oom), s.ctx)

    def working_memory(self, module: types.ModuleType, entry: ModelEntry,
                       request: BaseModel) -> int:
        """The module's estimate of a run's working memory at the serving precision. The
        estimates are sized for the real models: tiny mode's toys need a few MiB, so there they
        count only under an explicit VRAM_BUDGET (a simulated device, as the tests use), and a
        laptop serving `make serve` is never refused a size its RAM handles easily."""
        own = getattr(module, "working_memory", None)
        if own is None or (self.tiny and self.settings.vram_budget is None):
            return 0
        return int(own(entry, request, self._float_bytes(entry)))

    def _float_bytes(self, entry: ModelEntry) -> int:
        """Bytes per float at the entry's serving precision (CPU always runs float32)."""
        return 2 if self.device.is_cuda and entry.dtype != "float32" else 4

    async def stream(self, module: types.ModuleType, s: Session) -> AsyncIterator[BaseModel]:
        """The module's chunks for an open session, holding the lane slot and its working
        memory to the end (a reservation also tells other runs their peaks are shared)."""
        entry = s.ctx.entry
        async with self.executor.turn(s.lane, s.deadline), self.cache.reserve(
                entry, self.working_memory(module, entry, s.request), s.deadline):
            async for chunk in module.stream(s.model, s.request, s.ctx):
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


def unload_model(model: Any) -> None:
    """Models held by another process (an Ollama daemon) free their memory through `unload()`;
    in-process models are freed by dropping them."""
    if callable(getattr(model, "unload", None)):
        model.unload()


@dataclass
class Session:
    lane: Lane
    model: Any
    request: BaseModel
    ctx: RunContext
    deadline: float | None = None
