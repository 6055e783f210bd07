"""A fake accelerator for the warm-model cache's tests: a device (the `runner.memory.Memory`
protocol) and a loader (`runner.cache.Loader`) that agree on where every model's bytes are.

- `FakeDevice`: `others()` is the foreign bytes (settable) plus what a daemon holds for us
  (external models); `allocated()` is the bytes of in-process models on the device plus what
  leaky unloads and moves left behind; `measured(fn, model, ...)` returns `fn`'s result with the
  model's configured true working-memory peak.
- `FakeLoader`: models by name with an estimate (what `estimate()` says) and a true size (what
  `measure()` finds, `measured=` when they differ), optional working-memory peaks, leaks,
  immovable and external models, a host tier (`host=True` supplies `move`), loads that fail,
  and gates that hold a load, unload or move in its worker thread until the test opens them.

Names are given without the `test/` prefix that `entry()` puts on every model id.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import runner.cache
from runner.cache import Loader, ModelCache
from runner.registry import ModelEntry
from tests.support.helpers import HANG_S

PREFIX = "test/"


def entry(name: str, pipeline: str = "p") -> ModelEntry:
    return ModelEntry(id=f"{PREFIX}{name}", kind="fake", pipeline=pipeline)


@contextmanager
def cheap_gc() -> Iterator[list[int]]:
    """Eviction runs gc.collect(), ~50 ms with torch and fastapi imported; the cache's own gc
    is replaced so traces with dozens of evictions stay fast."""
    calls: list[int] = []
    saved = runner.cache.gc
    runner.cache.gc = SimpleNamespace(collect=lambda: calls.append(1))
    try:
        yield calls
    finally:
        runner.cache.gc = saved


@dataclass(eq=False)
class FakeModel:
    id: str
    nbytes: int  # true bytes of its weights
    peak: int | None = None  # true working-memory peak of one run
    external: bool = False  # held by a daemon: its bytes show in others(), not allocated()
    tier: str = "device"  # where the fake device has its weights: device | host | gone


class FakeDevice:
    """Device memory as the cache's `Memory` sees it. `total` is informational (the cache's
    base budget is given to the cache separately)."""

    def __init__(self, total: int = 0, foreign: int = 0):
        self.total = total
        self.foreign = foreign
        self.leaked = 0  # bytes leaky unloads/moves left allocated
        self.transient = 0  # what running requests hold right now (settable)
        self.models: list[FakeModel] = []  # every model not yet unloaded
        self.measurements = 0
        self._lock = threading.Lock()

    # -- the Memory protocol -------------------------------------------------------------------

    def others(self) -> int:
        with self._lock:
            return self.foreign + sum(m.nbytes for m in self.models
                                      if m.external and m.tier == "device")

    def allocated(self) -> int | None:
        with self._lock:
            return self.leaked + self.transient + sum(m.nbytes for m in self.models
                                                      if not m.external and m.tier == "device")

    def measured(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, int | None]:
        result = fn(*args)
        model = args[0] if args else None
        self.measurements += 1
        return result, getattr(model, "peak", None)

    async def measured_async(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, int | None]:
        result = await fn(*args)
        self.measurements += 1
        return result, getattr(args[0] if args else None, "peak", None)

    # -- what the loader does to it ------------------------------------------------------------

    def add(self, model: FakeModel) -> None:
        with self._lock:
            self.models.append(model)

    def place(self, model: FakeModel, tier: str, leak: int = 0) -> None:
        with self._lock:
            if model.tier == "device" and tier != "device":
                self.leaked += leak
            model.tier = tier
            if tier == "gone" and model in self.models:
                self.models.remove(model)

    def on_device(self) -> list[FakeModel]:
        with self._lock:
            return [m for m in self.models if m.tier == "device"]


class FakeLoader:
    """Sizes by name: `sizes` are the estimates, `measured` the true sizes where they differ
    (a misestimate). Counts loads, unloads, moves and releases."""

    def __init__(self, sizes: dict[str, int], measured: dict[str, int] | None = None, *,
                 device: FakeDevice | None = None, host: bool = False,
                 peaks: dict[str, int] | None = None, leaks: dict[str, int] | None = None,
                 immovable: set[str] | frozenset[str] = frozenset(),
                 external: set[str] | frozenset[str] = frozenset(),
                 load_seconds: dict[str, float] | None = None, delay: float = 0.0):
        def ids(d: dict[str, Any] | None) -> dict[str, Any]:
            return {f"{PREFIX}{k}": v for k, v in (d or {}).items()}

        self.device = device or FakeDevice()
        self.host = host
        self.sizes = ids(sizes)
        self.measured = ids(measured)
        self.peaks = ids(peaks)
        self.leaks = ids(leaks)
        self.immovable = {f"{PREFIX}{k}" for k in immovable}
        self.external_ids = {f"{PREFIX}{k}" for k in external}
        self.load_seconds = ids(load_seconds)  # sleeps in load(): a measured reload cost
        self.delay = delay  # a small sleep in every load, unload and move (slow release)
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.moves: list[tuple[str, str]] = []  # (id, tier)
        self.releases = 0
        self.failing: set[str] = set()  # ids whose load raises
        self.failing_moves: set[str] = set()  # ids whose move raises
        self.gates: dict[tuple[str, str], threading.Event] = {}
        self.started: dict[tuple[str, str], threading.Event] = {}
        self.on_release: Callable[[], None] = lambda: None
        # Called (in the worker thread) before a model leaves the device: (model, "none"|"host").
        self.on_evict: Callable[[FakeModel, str], None] = lambda model, tier: None
        self.errors: list[str] = []  # misuse seen by the fake (unloading twice, None models)

    def true_size(self, name_or_id: str) -> int:
        key = name_or_id if name_or_id.startswith(PREFIX) else PREFIX + name_or_id
        return self.measured.get(key, self.sizes[key])

    # -- gates ---------------------------------------------------------------------------------

    def block(self, name: str, op: str = "load") -> tuple[threading.Event, threading.Event]:
        """Hold `op` ("load", "unload" or "move") of `name` in its worker thread until the
        returned gate is set; `started` is set once it is waiting there."""
        gate, started = threading.Event(), threading.Event()
        self.gates[(op, PREFIX + name)] = gate
        self.started[(op, PREFIX + name)] = started
        return gate, started

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def _pass(self, op: str, model_id: str) -> None:
        if (op, model_id) in self.started:
            self.started[(op, model_id)].set()
        gate = self.gates.get((op, model_id))
        if gate is not None:
            assert gate.wait(HANG_S), f"test never opened the {op} gate of {model_id}"
        if self.delay:
            time.sleep(self.delay)

    # -- the Loader ----------------------------------------------------------------------------

    def load(self, e: ModelEntry) -> FakeModel:
        self.loads[e.id] += 1
        self._pass("load", e.id)
        if e.id in self.load_seconds:
            time.sleep(self.load_seconds[e.id])
        if e.id in self.failing:
            raise RuntimeError(f"broken checkpoint {e.id}")
        model = FakeModel(e.id, self.true_size(e.id), self.peaks.get(e.id),
                          external=e.id in self.external_ids)
        self.device.add(model)
        return model

    def estimate(self, e: ModelEntry) -> int:
        return self.sizes[e.id]

    def measure(self, model: FakeModel) -> int:
        return model.nbytes

    def release(self) -> None:
        self.releases += 1
        self.on_release()

    def unload(self, model: FakeModel | None) -> None:
        if model is None or model.tier == "gone":
            self.errors.append(f"unload of {model and model.id} twice or of no model")
            return
        self.unloads[model.id] += 1
        if model.tier == "device":
            self.on_evict(model, "none")
        self._pass("unload", model.id)
        self.device.place(model, "gone", self.leaks.get(model.id, 0))

    def move(self, e: ModelEntry, model: FakeModel | None, tier: str) -> None:
        if model is None or model.tier == "gone":
            self.errors.append(f"move of {e.id} after it was unloaded")
            raise RuntimeError("no model")
        if tier == "host":
            self.on_evict(model, "host")
        self._pass("move", e.id)
        if e.id in self.failing_moves:
            raise RuntimeError(f"cannot move {e.id}")
        self.moves.append((e.id, tier))
        self.device.place(model, tier, self.leaks.get(model.id, 0))

    def movable(self, model: FakeModel | None) -> bool:
        return model is not None and not model.external and model.id not in self.immovable

    @staticmethod
    def external(model: FakeModel | None) -> bool:
        # Like runner.device.held_elsewhere: a model already let go (None) is not external.
        return model is not None and model.external

    def loader(self) -> Loader:
        return Loader(load=self.load, estimate=self.estimate, measure=self.measure,
                      release=self.release, unload=self.unload,
                      move=self.move if self.host else None, movable=self.movable,
                      external=self.external)

    def cache(self, budget: int, host_budget: int = 0) -> ModelCache:
        return ModelCache(self.loader(), budget=budget, host_budget=host_budget,
                          memory=self.device)


# -- driving the cache the way the service does --------------------------------------------------

async def touch(cache: ModelCache, e: ModelEntry) -> Any:
    async with cache.use(e) as model:
        return model


async def run(cache: ModelCache, e: ModelEntry, estimate: int, *,
              deadline: float | None = None, hint: Callable[[float], str] | None = None,
              hold: asyncio.Event | None = None) -> Any:
    """One request: hold the model, reserve working memory, run (measured by the device) and,
    with `hold`, stay running until it is set."""
    async with cache.use(e, deadline) as model:
        async with cache.reserve(e, estimate, deadline, hint) as reserved:
            _, reserved.peak = cache.memory.measured(lambda m: None, model)
            if hold is not None:
                await hold.wait()
            return model


async def wait_for_thread_event(event: threading.Event, what: str = "the load") -> None:
    end = time.monotonic() + HANG_S
    while not event.is_set():
        if time.monotonic() > end:
            raise AssertionError(f"{what} never started")
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], bool], seconds: float = HANG_S) -> None:
    """Poll `check` while the cache's background tasks (a pinned model's restore) run."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)


def tiers(cache: ModelCache) -> dict[str, str]:
    """Model name -> tier, for every model the cache knows."""
    return {d["id"].removeprefix(PREFIX): d["tier"] for d in cache.describe()}
