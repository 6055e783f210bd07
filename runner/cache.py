"""The warm-model cache: every loaded model of the process, the safety checker included.

First version of DESIGN section 4: a byte budget, one load at a time, concurrent requests for a
cold model share its load, warm requests never wait behind a cold load, idle models are evicted
least-recently-used first, models with requests in flight or queued are never evicted, and
pinned models (the default warm models) never leave.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from runner import metrics
from runner.errors import FieldError, Unavailable
from runner.registry import ModelEntry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    entry: ModelEntry
    state: str = "cold"  # cold -> loading -> ready; failed loads leave the cache
    model: Any = None
    estimated: int = 0
    measured: int | None = None
    users: int = 0  # requests holding the model or waiting for it
    pinned: bool = False
    loads: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    loading: asyncio.Future | None = None

    @property
    def bytes(self) -> int:
        return self.measured if self.measured is not None else self.estimated

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.entry.id, "pipeline": self.entry.pipeline, "state": self.state,
            "tier": "device" if self.state == "ready" else "none", "pinned": self.pinned,
            "in_flight": self.users, "estimated_bytes": self.estimated,
            "measured_bytes": self.measured, "loads": self.loads,
            "load_seconds": round(self.load_seconds, 3),
        }


@dataclass
class Loader:
    """How the cache turns entries into models; supplied by the service."""

    load: Callable[[ModelEntry], Any]
    estimate: Callable[[ModelEntry], int]
    measure: Callable[[Any], int]
    release: Callable[[], None] = lambda: None
    unload: Callable[[Any], None] = lambda model: None  # before an evicted model is dropped


class ModelCache:
    def __init__(self, loader: Loader, budget: int):
        self._loader = loader
        self.budget = budget
        self._slots: dict[str, Slot] = {}
        self._load_lock = asyncio.Lock()
        metrics.BUDGET_BYTES.set(budget)

    @staticmethod
    def key(entry: ModelEntry) -> str:
        return f"{entry.pipeline}:{entry.id}"

    def _slot(self, entry: ModelEntry) -> Slot:
        return self._slots.setdefault(self.key(entry), Slot(entry))

    @property
    def resident_bytes(self) -> int:
        return sum(s.bytes for s in self._slots.values() if s.state == "ready")

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self._slots.values()]

    def resident(self, entry: ModelEntry) -> Any:
        """The loaded model of `entry`, or None; for inspection, not for serving requests."""
        slot = self._slots.get(self.key(entry))
        return slot.model if slot is not None and slot.state == "ready" else None

    def is_ready(self, entry: ModelEntry) -> bool:
        slot = self._slots.get(self.key(entry))
        return slot is not None and slot.state == "ready"

    async def pin(self, entry: ModelEntry) -> None:
        """Load `entry` and keep it resident for the life of the process."""
        self._slot(entry).pinned = True
        async with self.use(entry):
            pass

    async def load(self, entry: ModelEntry) -> None:
        """Load `entry` now (an operator warming a model before traffic arrives)."""
        async with self.use(entry):
            pass

    def unload(self, entry: ModelEntry) -> bool:
        """Unpin and drop `entry` if no request holds it; False when it is busy."""
        slot = self._slots.get(self.key(entry))
        if slot is None:
            return True
        if slot.users or slot.state == "loading":
            return False
        slot.pinned = False
        if slot.state == "ready":
            self._evict(slot)
        else:
            self._forget(slot)
        return True

    @asynccontextmanager
    async def use(self, entry: ModelEntry) -> AsyncIterator[Any]:
        slot = self._slot(entry)
        slot.users += 1  # counted before any await, so nothing evicts it while we wait
        try:
            await self._ready(slot)
            yield slot.model
        finally:
            slot.users -= 1
            slot.last_used = time.monotonic()

    async def _ready(self, slot: Slot) -> None:
        if slot.state == "ready":
            metrics.CACHE_HITS.inc()
            return
        if slot.loading is None:
            slot.loading = asyncio.ensure_future(self._load(slot))
        # Shielded: one client going away must not cancel a load others are waiting on.
        await asyncio.shield(slot.loading)

    async def _load(self, slot: Slot) -> None:
        entry = slot.entry
        async with self._load_lock:
            slot.state = "loading"
            started = time.monotonic()
            try:
                slot.estimated = await anyio.to_thread.run_sync(self._loader.estimate, entry)
                self._make_room(slot.estimated, keep=slot)
                model = await anyio.to_thread.run_sync(self._loader.load, entry)
            except BaseException:
                metrics.CACHE_LOADS.labels(entry.id, "failed").inc()
                self._forget(slot)
                raise
            slot.model, slot.state = model, "ready"
            # Off the event loop: a model held by a daemon is measured over HTTP.
            slot.measured = await anyio.to_thread.run_sync(self._loader.measure, model)
            slot.loads += 1
            slot.load_seconds = time.monotonic() - started
            slot.loading = None
            metrics.CACHE_LOADS.labels(entry.id, "ok").inc()
            metrics.LOAD_SECONDS.labels(entry.id).observe(slot.load_seconds)
            if slot.estimated:
                metrics.ESTIMATE_RATIO.labels(entry.id).set(slot.measured / slot.estimated)
            metrics.RESIDENT_BYTES.set(self.resident_bytes)
            log.info("loaded %s in %.2fs (%d MiB)", entry.id, slot.load_seconds,
                     slot.bytes >> 20)

    def _forget(self, slot: Slot) -> None:
        slot.state, slot.loading, slot.model = "cold", None, None
        if not slot.pinned and self._slots.get(self.key(slot.entry)) is slot:
            del self._slots[self.key(slot.entry)]

    def _make_room(self, needed: int, keep: Slot) -> None:
        """Evict idle models, least recently used first, but only once it is certain the
        load can then fit: a refused load must not cost anyone their warm model."""
        free = self.budget - self.resident_bytes
        if needed <= free:
            return
        ready = [s for s in self._slots.values() if s.state == "ready" and s is not keep]
        pinned = sum(s.bytes for s in ready if s.pinned)
        if needed > self.budget - pinned:
            raise FieldError(
                "model_id",
                f"{keep.entry.id} needs about {needed >> 20} MiB, more than this runner can hold "
                f"beside its warm models ({(self.budget - pinned) >> 20} MiB)",
            )
        idle = sorted((s for s in ready if s.users == 0 and not s.pinned),
                      key=lambda s: s.last_used)
        if needed > free + sum(s.bytes for s in idle):
            metrics.REJECTED.labels(keep.entry.id, "no_room").inc()
            raise Unavailable(f"no room to load {keep.entry.id} while other models are busy; "
                              "retry shortly", retry_after=5)
        for victim in idle:
            free += victim.bytes
            self._evict(victim)
            if needed <= free:
                return

    def evict_idle(self) -> None:
        """Drop every idle, unpinned model (after an out-of-memory error)."""
        for slot in [s for s in self._slots.values()
                     if s.state == "ready" and s.users == 0 and not s.pinned]:
            self._evict(slot)
        self._loader.release()

    def _evict(self, slot: Slot) -> None:
        log.info("evicting %s (%d MiB) to make room", slot.entry.id, slot.bytes >> 20)
        metrics.CACHE_EVICTIONS.labels(slot.entry.id).inc()
        try:
            self._loader.unload(slot.model)
        except Exception:  # a daemon that is already gone has nothing left to free
            log.warning("unloading %s failed", slot.entry.id, exc_info=True)
        self._forget(slot)
        gc.collect()
        self._loader.release()
        metrics.RESIDENT_BYTES.set(self.resident_bytes)
