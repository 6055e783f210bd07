"""The models' lifecycle: where they live (device, budgets, tiny mode), how they load, move and
compile through their pipeline's hooks, which warm ones are pinned, and the warm-up and health
loop behind /health's LOADING, READY and ERROR."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
from filelock import FileLock
from pydantic import BaseModel

from runner import checkpoints, footprint, hardware, heap, safety, sample, warm
from runner import device as devices
from runner.cache import Loader, ModelCache
from runner.errors import ModelLoadError, RunnerError
from runner.executor import Executor
from runner.handle import held_elsewhere, movable, unload_model
from runner.hub import ModelFiles, repo_folder
from runner.memory import CudaMemory, HostMemory, Memory
from runner.registry import ModelEntry, Registry
from runner.settings import Settings
from runner.spec import ModelHooks, PipelineSpec, read_hooks

log = logging.getLogger(__name__)
SAFETY = read_hooks(safety)


class Models:
    def __init__(self, settings: Settings, registry: Registry, specs: dict[str, PipelineSpec]):
        self.settings = settings
        self.registry = registry
        self.specs = specs
        self.hooks: dict[str, ModelHooks] = {n: s.hooks for n, s in specs.items()}
        self.hooks["safety"] = SAFETY
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
        self._deferred: list[ModelEntry] = []  # warm models whose compile waits for READY
        self.warm_plan: warm.WarmPlan | None = None  # which warm models are pinned
        self._estimates: dict[str, int] = {}  # warm models' estimated bytes, by id
        self._default_runs: dict[str, int] = {}  # default requests' estimates, by pipeline
        self.memory: Memory = CudaMemory(self.device.index) if self.device.is_cuda \
            else HostMemory()
        self.cache = ModelCache(
            Loader(load=self._load, estimate=self._estimate, measure=footprint.measure,
                   release=devices.empty_cache, unload=unload_model, move=self._move,
                   movable=movable, external=held_elsewhere),
            budget=self._budget(), host_budget=self._host_budget(), memory=self.memory,
        )

    @property
    def mode(self) -> str:
        return "tiny" if self.tiny else "gpu" if self.device.is_cuda else "cpu"

    def files(self, entry: ModelEntry) -> ModelFiles:
        return ModelFiles(self.model_dir, entry.id)

    # -- one model --------------------------------------------------------------------------

    def _estimate(self, entry: ModelEntry) -> int:
        if self.tiny:
            self._build_tiny(entry)
        float_bytes = self.float_bytes(entry)
        # A pipeline may know better (llm: a model an Ollama daemon holds has no weights here).
        own = self.hooks[entry.pipeline].estimate(entry, self.files(entry), float_bytes)
        return own if own is not None else footprint.estimate(entry, self.files(entry),
                                                                float_bytes)

    def _load(self, entry: ModelEntry) -> Any:
        hooks = self.hooks[entry.pipeline]
        if problems := self.entry_problems(entry):  # an interrupted download: say which file
            raise ModelLoadError(
                f"the files of {entry.id} in {self.model_dir} are missing or broken: "
                f"{'; '.join(problems)}; fetch them again with "
                f"`{checkpoints.fetch_command([entry.id], self.model_dir)}`")
        model = hooks.load(entry, self.files(entry), self.device)
        if self.device.compile and hooks.warm_up is not None:
            if self.state == "LOADING" and entry in self.pinned():
                self._deferred.append(entry)  # after READY: see _compile_deferred
            else:  # a model loaded for a request: compiled before that request runs
                self._compile(model, entry)
        return model

    def _compile(self, model: Any, entry: ModelEntry) -> None:
        """TORCH_COMPILE: one warm-up run at the served sizes compiles the model, so no client
        request pays for it."""
        warm_up = self.hooks[entry.pipeline].warm_up
        assert warm_up is not None  # only models whose pipeline has the hook are compiled
        started = time.perf_counter()
        warm_up(model, entry)
        log.info("compiled %s for its served sizes in %.1fs", entry.id,
                 time.perf_counter() - started)

    async def _compile_deferred(self, executor: Executor) -> None:
        """The warm models' compiles run once /health has left LOADING, since go-livepeer
        counts LOADING past 3 minutes as failures and compiling SDXL can take longer. Each runs
        in its model's lane like a request: /health says OK until it is done (so a warm
        container stays out of go-livepeer's pool until then), and requests wait behind it
        instead of compiling too."""
        while self._deferred:
            entry = self._deferred.pop(0)
            try:
                async with executor.admit(ModelCache.key(entry), entry.max_concurrency,
                                          entry.id) as lane:
                    async with executor.turn(lane), self.cache.use(entry) as model:
                        await executor.call(self._compile, model, entry)
            except Exception as exc:  # the model still serves, uncompiled where it failed
                log.error("compiling %s failed: %s", entry.id, exc, exc_info=exc)

    def _move(self, entry: ModelEntry, model: Any, tier: str) -> None:
        """Between the device and CPU RAM."""
        target = self.device.torch if tier == "device" else "cpu"
        self.hooks[entry.pipeline].move(model, target)

    def _build_tiny(self, entry: ModelEntry) -> None:
        """Tiny checkpoints are the runner's own cache: written when the entry's files are
        missing, checked like MODEL_DIR's when they are there, and written again when broken
        (a truncated file, an interrupted write), said once in the log. The file lock keeps two
        processes sharing TINY_DIR from writing the same folder at once."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.model_dir / ".build.lock")):
            if not self.files(entry).present(entry.sources()):
                log.info("tiny mode: writing a random-weight %s for %s", entry.kind, entry.id)
            elif problems := self._file_check(entry):
                log.warning("tiny mode: the random-weight files of %s are broken (%s); writing "
                            "them again", entry.id, "; ".join(problems))
                for source in entry.sources():
                    shutil.rmtree(repo_folder(self.model_dir, source.repo), ignore_errors=True)
            else:
                return
            self.hooks[entry.pipeline].build_tiny(entry, self.model_dir)

    def float_bytes(self, entry: ModelEntry) -> int:
        """Bytes per float at the entry's serving precision (CPU always runs float32)."""
        return 2 if self.device.is_cuda and entry.dtype != "float32" else 4

    def working_memory(self, spec: PipelineSpec, entry: ModelEntry, request: BaseModel) -> int:
        """The pipeline's estimate of a run's working memory: from the model's architecture
        (its config files), the request's size, and the serving precision. The one estimate
        both admission (runner/service.py) and the warm plan reserve, through
        `ModelCache.working_bytes`, which corrects it by the peaks measured on CUDA."""
        if spec.working_memory is None:
            return 0
        return int(spec.working_memory(entry, self.files(entry), request,
                                       self.float_bytes(entry)))

    # -- budgets ----------------------------------------------------------------------------

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

    # -- the warm models --------------------------------------------------------------------

    def pinned(self) -> list[ModelEntry]:
        return self.warm_plan.pinned if self.warm_plan is not None else []

    def on_demand(self) -> list[ModelEntry]:
        return self.warm_plan.on_demand if self.warm_plan is not None else []

    def _needs_safety(self) -> bool:
        return any(spec.checks_safety for spec in self.specs.values())

    def warm_entries(self) -> list[ModelEntry]:
        warm = [self.registry.default(name) for name in self.specs]
        return warm + ([self.registry.safety_checker] if self._needs_safety() else [])

    async def _serving(self) -> bool:
        """Every pinned warm model resident (loading any that are not) and, for pipelines with
        a `health(model)` hook (a daemon that may go away), healthy. The plan is checked again
        each time against what is now known (measured sizes and peaks, others' memory): a
        model that no longer fits pinned is unpinned, and a pipeline that can no longer be
        served at all is an error."""
        self._adopt(await self._plan_warm())
        for entry in self.pinned():
            await self.cache.pin(entry)
        for name, spec in self.specs.items():
            model = self.cache.resident(self.registry.default(name))
            if model is not None and not await spec.hooks.health(model):
                return False
        return True

    def _adopt(self, plan: warm.WarmPlan) -> None:
        if self.warm_plan is not None and plan.pinned == self.warm_plan.pinned:
            return
        if plan.on_demand:
            log.warning("the budget (%d MiB) cannot keep every warm model beside the others' "
                        "default-sized requests: %s pinned, %s loaded on demand and swapped "
                        "(slower: each swap is a load)", self.cache.budget >> 20,
                        ", ".join(e.id for e in plan.pinned) or "none",
                        ", ".join(e.id for e in plan.on_demand))
        for entry in self.pinned():
            if entry not in plan.pinned:
                self.cache.unpin(entry)
        self.warm_plan = plan

    async def _plan_warm(self) -> warm.WarmPlan:
        """The warm plan for the budget as it is now (runner/warm.py); a pipeline that cannot
        be served even with nothing pinned is an error naming it and the budget it needs."""
        for entry in self.warm_entries():
            if entry.id not in self._estimates:
                self._estimates[entry.id] = await anyio.to_thread.run_sync(self._estimate,
                                                                           entry)
        # The default requests' estimates read configs and encode sample uploads: off the
        # loop, once. The plan itself reads the cache's state, so it is made on the loop.
        await anyio.to_thread.run_sync(self._default_runs_estimated)
        plan = self._fit()
        if plan.unservable:
            raise ModelLoadError("; ".join(why for _, why in plan.problems(self.cache.budget)))
        return plan

    def _fit(self) -> warm.WarmPlan:
        """The warm plan for the warm models' sizes (measured once loaded) and the working
        memory admission would reserve for each pipeline's default-sized request now."""
        entries = self.warm_entries()
        sizes = {e.id: self.cache.measured_bytes(e) or self._estimates[e.id] for e in entries}
        self.cache.refresh()
        return warm.plan(entries, self.demands(), sizes, self.cache.budget)

    def demands(self) -> list[warm.Demand]:
        checker = self.registry.safety_checker
        return [warm.Demand(name, self.registry.default(name),
                            checker if spec.checks_safety else None, self.default_reserve(name))
                for name, spec in self.specs.items()]

    def default_reserve(self, name: str) -> int:
        """What admission reserves now for pipeline `name`'s default-sized request of its
        default model: the estimate, corrected by the peaks measured on CUDA."""
        entry = self.registry.default(name)
        return self.cache.working_bytes(entry, self._default_run(name))[0]

    def _default_runs_estimated(self) -> None:
        for name in self.specs:
            self._default_run(name)

    def _default_run(self, name: str) -> int:
        """The working-memory estimate of pipeline `name`'s default-sized request (its sample
        at the default scale, uploads included) on its default model; estimated once."""
        if name not in self._default_runs:
            spec, entry = self.specs[name], self.registry.default(name)
            example = spec.sample_request(sample.Scale()) if spec.sample_request else None
            request = sample.default_request(spec.request, example,
                                             {**entry.defaults, **entry.fixed})
            self._default_runs[name] = self.working_memory(spec, entry, request)
        return self._default_runs[name]

    async def warm_up(self, executor: Executor) -> None:
        """Load and pin every served pipeline's default model (and the safety checker), or
        those the budget can hold beside the others' turns: /health says LOADING until they
        are resident, ERROR if one failed. Then keep checking every HEALTH_PROBE_SECONDS: a
        warm model that failed is retried, and a daemon that went away (or came back) shows
        in /health; memory the process freed meanwhile goes back to the system
        (runner/heap.py)."""
        if self.device.is_cuda:
            await anyio.to_thread.run_sync(devices.configure_for_cuda)
        if self.tiny:
            await anyio.to_thread.run_sync(devices.configure_for_tiny)
        while True:
            await self._probe()
            await self._compile_deferred(executor)
            if self.settings.health_probe_seconds <= 0:
                return
            await asyncio.sleep(self.settings.health_probe_seconds)
            await self.cache.rebalance()
            await anyio.to_thread.run_sync(heap.trim)

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
                     ", ".join(e.id for e in self.warm_entries()))
        elif not healthy and self.state != "ERROR":
            log.error("a warm model's backend is unhealthy; /health reports ERROR")
        self.state = "READY" if healthy else "ERROR"

    # -- files ------------------------------------------------------------------------------

    def file_problems(self) -> dict[str, list[str]]:
        """What the warm models' files lack, read from disk without loading anything; checked
        before the port is bound, so a runner that could never serve exits once with the
        download command instead of reporting ERROR, which go-livepeer answers by re-creating
        the container for ever. Tiny mode writes its own files, so nothing is missing there."""
        if self.tiny:
            return {}
        found = {}
        for entry in self.warm_entries():
            if problems := self.entry_problems(entry):
                found[entry.id] = problems
        return found

    def budget_problems(self) -> dict[str, str]:
        """Pipelines the budget can never serve (a default-sized request of the default model
        beside the safety checker where it needs it), by name, read before the port is bound:
        such a runner could never keep the promise of IDLE. Tiny mode writes its models first."""
        self._estimates = {e.id: self._estimate(e) for e in self.warm_entries()}
        return dict(self._fit().problems(self.cache.budget))

    def entry_problems(self, entry: ModelEntry) -> list[str]:
        """What `entry`'s files lack (runner/checkpoints.py, or the pipeline's own check);
        nothing in tiny mode, which checks and writes its own files (`_build_tiny`)."""
        return [] if self.tiny else self._file_check(entry)

    def _file_check(self, entry: ModelEntry) -> list[str]:
        try:
            problems = self.hooks[entry.pipeline].file_problems(entry, self.files(entry))
        except RunnerError as exc:  # e.g. a backend setting that names nothing
            return [exc.msg]
        return checkpoints.entry_problems(entry, self.model_dir) if problems is None \
            else problems

    async def close(self) -> None:
        """At shutdown, after in-flight requests: give every model's memory back (a daemon's
        too, which would otherwise keep it after this process is gone)."""
        await self.cache.close()
