"""The warm-model cache (DESIGN section 4): every loaded model of the process, the safety
checker included, on one device budget.

A model lives in a tier: `device` (ready to serve), `host` (demoted to CPU RAM, a fast reload)
or `none`. Requests hold their model with `use()` (it is brought to the device, sharing one
load with every other request for it) and reserve their working memory with `reserve()` just
before they run. Room is made by moving idle models down a tier, cheapest to bring back per
byte freed first; models in use never move; pinned models (the warm defaults) are only
demoted, and only when nothing else frees enough, and come back once the device is idle.

The budget is `base_budget` minus what others hold on the device (read from `Memory`) minus
what an unload failed to give back.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from runner import metrics
from runner.errors import Busy, BusyReason, FieldError
from runner.footprint import walk
from runner.memory import HostMemory, Memory
from runner.registry import ModelEntry

log = logging.getLogger(__name__)

DISK_BYTES_PER_S = 1 << 30  # reload-cost guesses until a model's own times are measured
HOST_BYTES_PER_S = 8 << 30
SAFETY_MARGIN = 1.1  # on measured working-memory peaks


def event(name: str, **fields: Any) -> None:
    """One structured log line per cache decision: `cache event=evict model=... bytes=...`."""
    log.info("cache event=%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))


@dataclass
class Learned:
    """What the cache has measured about a model; kept after the model leaves memory."""

    weights: int | None = None  # measured bytes on the device
    load_seconds: float | None = None  # from disk
    promote_seconds: float | None = None  # from the host tier
    peaks: dict[int, int] = field(default_factory=dict)  # working-memory peak per size bucket
    ratio: float | None = None  # measured peak over estimate, the largest seen
    # The last run's working memory: its estimate, what was reserved (the estimate corrected
    # by what was learned), and its measured peak (None where the device cannot say: the CPU).
    estimate: int | None = None
    reserved: int | None = None
    peak: int | None = None
    run_seconds: float = 1.0  # exponential average of a reservation's length


@dataclass(eq=False)
class Slot:
    entry: ModelEntry
    learned: Learned
    tier: str = "none"  # none | host | device
    target: str | None = None  # the tier a move in flight goes to; counted in both meanwhile
    moving: asyncio.Future | None = None  # a load, promotion, demotion or drop in flight
    model: Any = None
    estimated: int = 0
    users: int = 0  # requests holding the model or waiting for it
    running: int = 0  # working-memory bytes reserved by its running requests
    waiting: int = 0  # of its users, those parked in reserve() until something changes
    pinned: bool = False
    loads: int = 0
    hits: int = 0
    demotions: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def bytes(self) -> int:
        return self.learned.weights if self.learned.weights is not None else self.estimated

    def occupies(self, tier: str) -> bool:
        return self.tier == tier or self.target == tier

    @property
    def idle(self) -> bool:
        return self.users == 0 and self.moving is None

    def reload_seconds(self, tier: str) -> float:
        """What bringing it back costs if it goes to `tier` now."""
        if tier == "host":
            known = self.learned.promote_seconds
            return known if known is not None else self.bytes / HOST_BYTES_PER_S
        known = self.learned.load_seconds
        return known if known is not None else self.bytes / DISK_BYTES_PER_S

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.entry.id, "pipeline": self.entry.pipeline,
            "state": "loading" if self.moving is not None and self.target == "device"
            else {"device": "ready", "host": "demoted", "none": "cold"}[self.tier],
            "tier": self.tier, "pinned": self.pinned, "in_flight": self.users,
            "estimated_bytes": self.estimated, "measured_bytes": self.learned.weights,
            "running_bytes": self.running, "loads": self.loads, "hits": self.hits,
            "demotions": self.demotions,
            "load_seconds": round(self.learned.load_seconds or 0.0, 3),
            "idle_seconds": round(now - self.last_used, 1),
            "working_memory": {"estimated_bytes": self.learned.estimate,
                               "reserved_bytes": self.learned.reserved,
                               "measured_bytes": self.learned.peak,
                               "largest_ratio": self.learned.ratio},
        }


@dataclass
class Loader:
    """How the cache turns entries into models; supplied by the service."""

    load: Callable[[ModelEntry], Any]
    estimate: Callable[[ModelEntry], int]
    measure: Callable[[Any], int]
    release: Callable[[], None] = lambda: None
    unload: Callable[[Any], None] = lambda model: None  # before a dropped model is let go
    # move(entry, model, "host" | "device"), in place; None: no host tier
    move: Callable[[ModelEntry, Any, str], None] | None = None
    movable: Callable[[Any], bool] = lambda model: True
    external: Callable[[Any], bool] = lambda model: False  # held by another process (Ollama)


@dataclass(eq=False)
class Reservation:
    """A running request's share of the device's working memory."""

    nbytes: int
    bucket: int
    peak: int | None = None  # set from the worker thread once the run is over
    shared: bool = False  # other runs overlapped it, so its peak is not its own
    started: float = field(default_factory=time.monotonic)


class ModelCache:
    def __init__(self, loader: Loader, budget: int, host_budget: int = 0,
                 memory: Memory | None = None):
        self._loader = loader
        self.base_budget = budget
        self.host_budget = host_budget if loader.move is not None else 0
        self.memory: Memory = memory or HostMemory()
        self.foreign = 0  # bytes others hold on the device, as last read
        self.leaked = 0  # bytes unloads did not give back
        self._slots: dict[str, Slot] = {}
        self._learned: dict[str, Learned] = {}
        self._reservations: set[Reservation] = set()
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._restoring: asyncio.Future | None = None
        # Device-memory changes (loads, moves) in flight and ever started: a move's freed
        # bytes are only checked for a leak when nothing else changed the device meanwhile.
        self._changing = self._changes = 0
        self._runs = 0  # reservations ever started: a move's leak check needs none meanwhile
        self._expose_gauges()

    def _expose_gauges(self) -> None:
        """The byte gauges read this cache when scraped, not on every request (a weak
        reference: a later cache of the process, a test's, takes them over)."""
        cache = weakref.ref(self)

        def reading(value: Callable[[ModelCache], float]) -> Callable[[], float]:
            return lambda: value(c) if (c := cache()) is not None else 0.0

        metrics.BUDGET_BYTES.set_function(reading(lambda c: c.budget))
        metrics.FOREIGN_BYTES.set_function(reading(lambda c: c.foreign + c.leaked))
        metrics.RESIDENT_BYTES.labels("device").set_function(reading(lambda c: c.resident_bytes))
        metrics.RESIDENT_BYTES.labels("host").set_function(reading(lambda c: c.tier_bytes("host")))
        metrics.RUNNING_BYTES.set_function(reading(lambda c: c.running_bytes))

    # -- bookkeeping --------------------------------------------------------------------------

    @staticmethod
    def key(entry: ModelEntry) -> str:
        return f"{entry.pipeline}:{entry.id}"

    def _slot(self, entry: ModelEntry) -> Slot:
        key = self.key(entry)
        if key not in self._slots:
            self._slots[key] = Slot(entry, self._learned.setdefault(key, Learned()))
        return self._slots[key]

    @property
    def budget(self) -> int:
        return max(0, self.base_budget - self.foreign - self.leaked)

    def tier_bytes(self, tier: str) -> int:
        return sum(s.bytes for s in self._slots.values() if s.occupies(tier))

    @property
    def resident_bytes(self) -> int:
        return self.tier_bytes("device")

    @property
    def running_bytes(self) -> int:
        return sum(s.running for s in self._slots.values())

    @property
    def free(self) -> int:
        return self.budget - self.resident_bytes - self.running_bytes

    def refresh(self) -> None:
        """Read what others hold now; models another process holds for us (an Ollama daemon's)
        are ours, not foreign."""
        ours_elsewhere = sum(s.bytes for s in self._slots.values()
                             if s.tier == "device" and self._loader.external(s.model))
        self.foreign = max(0, self.memory.others() - ours_elsewhere)

    def _notify(self) -> None:
        """Wake everything waiting for room; and once no request holds a model, bring demoted
        pinned models back."""
        self._changed.set()
        self._changed = asyncio.Event()
        for s in self._slots.values():
            s.waiting = 0  # all woken
        if self._restoring is None and self._device_idle() and any(
                s.pinned and s.tier == "host" and s.idle for s in self._slots.values()):
            self._restoring = asyncio.ensure_future(self._restore_pinned())

    def _device_idle(self) -> bool:
        return not any(s.users for s in self._slots.values())

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [s.describe(now) for s in self._slots.values()]

    def summary(self) -> dict[str, int]:
        return {"budget_bytes": self.budget, "base_budget_bytes": self.base_budget,
                "foreign_bytes": self.foreign, "leaked_bytes": self.leaked,
                "resident_bytes": self.resident_bytes, "running_bytes": self.running_bytes,
                "host_budget_bytes": self.host_budget, "host_bytes": self.tier_bytes("host")}

    def measured_bytes(self, entry: ModelEntry) -> int | None:
        """`entry`'s weights as measured once loaded (kept after it leaves), else None."""
        learned = self._learned.get(self.key(entry))
        return learned.weights if learned is not None else None

    def resident(self, entry: ModelEntry) -> Any:
        """The model of `entry` if it is on the device; for inspection, not for serving."""
        slot = self._slots.get(self.key(entry))
        return slot.model if slot is not None and slot.tier == "device" else None

    # -- operator actions ---------------------------------------------------------------------

    async def pin(self, entry: ModelEntry) -> None:
        """Load `entry` and keep it in memory for the life of the process. The health probe
        calls this every few seconds: a pinned model already on the device is left alone (and
        not counted as a request's hit)."""
        slot = self._slot(entry)
        if not (slot.tier == "device" and slot.moving is None):
            async with self.use(entry):
                pass
        slot.pinned = True  # once loaded: a load that failed pins nothing

    def unpin(self, entry: ModelEntry) -> None:
        """Let `entry` leave memory like any other model (it stays until room is needed)."""
        slot = self._slots.get(self.key(entry))
        if slot is not None and slot.pinned:
            slot.pinned = False
            event("unpin", model=entry.id)
            self._notify()

    async def load(self, entry: ModelEntry) -> None:
        """Bring `entry` to the device now (warming a model before traffic arrives)."""
        async with self.use(entry):
            pass

    async def unload(self, entry: ModelEntry) -> bool:
        """Unpin `entry` and drop it from memory; False while requests hold it."""
        slot = self._slots.get(self.key(entry))
        if slot is None:
            return True
        if not slot.idle:
            return False
        slot.pinned = False
        if slot.tier == "none":
            self._forget(slot)
        else:
            await self._execute([(slot, "none")], reason="operator")
        return True

    async def demote(self, entry: ModelEntry) -> bool:
        """Move an idle model to the host tier now (the benchmark's eviction-cost probe);
        False when it is busy, not on the device, or cannot move there."""
        slot = self._slots.get(self.key(entry))
        if slot is None or not slot.idle or slot.tier != "device" or not self._demotable(slot):
            return False
        await self._execute([(slot, "host")], reason="operator")
        return slot.tier == "host"

    # -- serving ------------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, entry: ModelEntry, deadline: float | None = None) -> AsyncIterator[Any]:
        """Hold `entry`'s model on the device for a request; loaded or promoted if it is not."""
        slot = self._slot(entry)
        slot.users += 1  # counted before any await, so nothing moves it while we wait
        try:
            await self._on_device(slot, deadline)
            yield slot.model
        finally:
            slot.users -= 1
            slot.last_used = time.monotonic()
            if slot.tier == "none" and slot.idle:
                self._forget(slot)
            self._notify()

    async def _on_device(self, slot: Slot, deadline: float | None) -> None:
        if slot.tier == "device" and slot.moving is None:
            slot.hits += 1
            metrics.CACHE_REQUESTS.labels(slot.entry.id, "hit").inc()
            return
        metrics.CACHE_REQUESTS.labels(slot.entry.id, "miss").inc()
        while not (slot.tier == "device" and slot.moving is None):
            if slot.moving is None:
                slot.moving = asyncio.ensure_future(self._bring(slot))
            # Shielded: one client going away must not cancel a load others are waiting on.
            await _until(asyncio.shield(slot.moving), deadline, slot.entry.id,
                         f"{slot.entry.id} is still loading", slot.reload_seconds("none"))

    async def _bring(self, slot: Slot) -> None:
        """Load from disk or promote from the host tier, one at a time per device."""
        try:
            async with self._load_lock:
                source = slot.tier
                if source == "none":
                    slot.estimated = await anyio.to_thread.run_sync(
                        self._loader.estimate, slot.entry)
                await self._make_room(slot.bytes, keep=slot)
                slot.target = "device"
                started = time.monotonic()
                await self._fill(slot, source)
                self._loaded(slot, source, time.monotonic() - started)
                if self.free < 0:  # it measured bigger than its estimate: idle models move
                    await self.rebalance()
        except BaseException:
            if slot.tier == "none":
                metrics.CACHE_LOADS.labels(slot.entry.id, "disk", "failed").inc()
            raise
        finally:
            slot.target, slot.moving = None, None
            if slot.tier == "none" and slot.idle:
                self._forget(slot)
            self._notify()

    async def _fill(self, slot: Slot, source: str) -> None:
        self._changing, self._changes = self._changing + 1, self._changes + 1
        self._disturb_runs()
        try:
            if source == "host":
                await self._move(slot, "device")
            else:
                slot.model = await anyio.to_thread.run_sync(self._loader.load, slot.entry)
                # Off the event loop: a model held by a daemon is measured over HTTP.
                slot.learned.weights = await anyio.to_thread.run_sync(self._loader.measure,
                                                                      slot.model)
        finally:
            self._changing -= 1
        slot.tier = "device"

    def _loaded(self, slot: Slot, source: str, seconds: float) -> None:
        if source == "host":
            slot.learned.promote_seconds = seconds
        else:
            slot.learned.load_seconds = seconds
            slot.loads += 1
            if slot.estimated:
                metrics.ESTIMATE_RATIO.labels(slot.entry.id).set(slot.bytes / slot.estimated)
        tier = "disk" if source == "none" else source
        metrics.CACHE_LOADS.labels(slot.entry.id, tier, "ok").inc()
        metrics.LOAD_SECONDS.labels(slot.entry.id, tier).observe(seconds)
        event("load", model=slot.entry.id, source=tier, seconds=f"{seconds:.3f}",
              bytes=slot.bytes, estimated=slot.estimated)

    def _forget(self, slot: Slot) -> None:
        """A model out of memory leaves the listing, unless it is pinned or a request that
        arrived meanwhile holds its slot."""
        slot.tier, slot.model = "none", None
        if not slot.pinned and not slot.users and self._slots.get(self.key(slot.entry)) is slot:
            del self._slots[self.key(slot.entry)]

    # -- working memory -----------------------------------------------------------------------

    def working_bytes(self, entry: ModelEntry, estimate: int) -> tuple[int, int]:
        """The bytes to reserve for a run whose estimate is `estimate`, corrected by what runs
        of the same size measured, and the size bucket they are filed under."""
        if estimate <= 0:
            return 0, 0
        learned = self._learned.setdefault(self.key(entry), Learned())
        bucket = estimate.bit_length()
        if bucket in learned.peaks:
            return int(learned.peaks[bucket] * SAFETY_MARGIN), bucket
        if learned.ratio is not None:
            return int(estimate * learned.ratio * SAFETY_MARGIN), bucket
        return estimate, bucket

    @asynccontextmanager
    async def reserve(self, entry: ModelEntry, estimate: int, deadline: float | None = None,
                      hint: Callable[[float], str] | None = None) -> AsyncIterator[Reservation]:
        """Working memory for one run of `entry` (held with `use()`): waits until it fits
        beside the resident models and the other running peaks, moving idle models out of
        the way; a run that could never fit is a 422, with `hint(fraction)` saying what size
        would (`fraction` of this one's working memory fits)."""
        slot = self._slot(entry)
        nbytes, bucket = self.working_bytes(entry, estimate)
        if nbytes:
            await self._admit(slot, nbytes, deadline, hint)
        r = Reservation(nbytes, bucket, shared=bool(self._reservations or self._changing))
        self._disturb_runs()
        self._reservations.add(r)
        self._runs += 1
        slot.running += nbytes
        try:
            yield r
        finally:
            self._reservations.discard(r)
            slot.running -= nbytes
            self._learn(slot, r, estimate)
            self._notify()

    def _disturb_runs(self) -> None:
        """The device-wide peak a running request measures now includes someone else's bytes
        (another run, a model loading, moving or being freed): it is not learned from."""
        for r in self._reservations:
            r.shared = True

    def _learn(self, slot: Slot, r: Reservation, estimate: int) -> None:
        learned = slot.learned
        learned.run_seconds = 0.8 * learned.run_seconds + 0.2 * (time.monotonic() - r.started)
        learned.estimate, learned.reserved = estimate, r.nbytes
        learned.peak = None if r.shared else r.peak
        if r.peak is None or r.shared or estimate <= 0:
            return
        learned.peaks[r.bucket] = max(learned.peaks.get(r.bucket, 0), r.peak)
        learned.ratio = max(learned.ratio or 0.0, r.peak / estimate)
        metrics.ACTIVATION_RATIO.labels(slot.entry.id).set(r.peak / estimate)

    def oom(self, entry: ModelEntry, r: Reservation | None) -> None:
        """A run ran out of device memory: its size class needs more than was reserved."""
        metrics.OOMS.labels(entry.id).inc()
        event("oom", model=entry.id, reserved=r.nbytes if r else 0)
        if r is not None and r.bucket:
            learned = self._slot(entry).learned
            learned.peaks[r.bucket] = max(learned.peaks.get(r.bucket, 0),
                                          int(max(r.nbytes, 1) * 1.5))

    async def _admit(self, slot: Slot, nbytes: int, deadline: float | None,
                     hint: Callable[[float], str] | None) -> None:
        while True:
            self.refresh()
            if nbytes <= self.free:
                event("admit", model=slot.entry.id, bytes=nbytes, free=self.free)
                return
            limit = self.budget - slot.bytes - self._immovable_bytes(keep=slot)
            if nbytes > limit:
                metrics.REJECTED.labels(slot.entry.id, "too_large").inc()
                event("reject", model=slot.entry.id, bytes=nbytes, largest=max(0, limit))
                largest = max(0, limit)
                raise TooLarge(slot.entry.id, nbytes, largest,
                               hint(largest / nbytes) if hint else "")
            plan = self._plan(nbytes - self.free, keep=slot)
            if plan:
                before = self.free
                await self._execute(plan, reason="working memory")
                if self.free > before:
                    continue
            if self._stuck(slot):
                event("reject", model=slot.entry.id, bytes=nbytes, free=self.free,
                      reason="held_by_waiters")
                raise Busy(slot.entry.id, BusyReason.NO_ROOM,
                           f"{slot.entry.id} needs device memory that models held by other "
                           "waiting requests keep; retry shortly",
                           retry_after=math.ceil(self._retry_after()))
            changed = self._changed
            slot.waiting += 1
            try:
                await _until(changed.wait(), deadline, slot.entry.id,
                             f"{slot.entry.id} is waiting for device memory",
                             self._retry_after())
            finally:
                if changed is self._changed:  # not woken (past its deadline): uncount it
                    slot.waiting -= 1

    def _stuck(self, keep: Slot) -> bool:
        """Waiting cannot help: nothing runs or moves, and every other model in use is held
        only by requests parked here too (each holding what another needs)."""
        return not self.running_bytes and all(
            s.moving is None and (s is keep or s.users == s.waiting)
            for s in self._slots.values())

    def _retry_after(self) -> float:
        busy = [s.learned.run_seconds for s in self._slots.values() if s.running]
        return max(busy, default=1.0)

    # -- making room --------------------------------------------------------------------------

    def _immovable_bytes(self, keep: Slot) -> int:
        """Device bytes nothing can free: pinned models that cannot be demoted."""
        return sum(s.bytes for s in self._slots.values() if s is not keep and s.pinned
                   and s.occupies("device") and s.target != "host" and not self._demotable(s))

    def _demotable(self, slot: Slot) -> bool:
        return (self.host_budget > 0 and slot.model is not None
                and slot.bytes <= self.host_budget - self._pinned_host_bytes()
                and self._loader.movable(slot.model))

    def _pinned_host_bytes(self) -> int:
        return sum(s.bytes for s in self._slots.values() if s.pinned and s.occupies("host"))

    async def _make_room(self, needed: int, keep: Slot) -> None:
        """Free device bytes for a load, but only once it is certain the load can then fit: a
        refused load must not cost anyone their warm model."""
        self.refresh()
        if needed <= self.free:
            return
        limit = self.budget - self._immovable_bytes(keep)
        if needed > limit:
            metrics.REJECTED.labels(keep.entry.id, "too_large").inc()
            event("reject", model=keep.entry.id, bytes=needed, largest=max(0, limit))
            raise FieldError(
                "model_id",
                f"{keep.entry.id} needs about {needed >> 20} MiB, more than this runner can hold "
                f"beside its pinned models ({max(0, limit) >> 20} MiB)")
        plan = self._plan(needed - self.free, keep)
        if not plan:
            event("reject", model=keep.entry.id, bytes=needed, free=self.free, reason="busy")
            raise Busy(keep.entry.id, BusyReason.NO_ROOM,
                       f"no room to load {keep.entry.id} while other models are busy; retry "
                       "shortly", retry_after=math.ceil(self._retry_after()))
        await self._execute(plan, reason=f"load {keep.entry.id}")
        if needed > self.free:
            raise Busy(keep.entry.id, BusyReason.NO_ROOM,
                       f"could not free enough memory to load {keep.entry.id}; retry shortly",
                       retry_after=math.ceil(self._retry_after()))

    def _plan(self, shortfall: int, keep: Slot | None) -> list[tuple[Slot, str]]:
        """Idle device models to move out, and where to, freeing at least `shortfall` bytes at
        the least reload cost per byte; pinned models only as a last resort, and only down to
        the host tier. Empty when even all of them would not free enough."""
        options = []
        for s in self._slots.values():
            if s is keep or s.tier != "device" or not s.idle:
                continue
            target = "host" if self._demotable(s) else "none"
            if s.pinned and target == "none":
                continue
            cost = round(s.reload_seconds(target), 1) / max(s.bytes, 1)
            options.append(((s.pinned, cost, s.last_used), s, target))
        options.sort(key=lambda o: o[0])
        plan, freed = [], 0
        for _, slot, target in options:
            if freed >= shortfall:
                break
            plan.append((slot, target))
            freed += slot.bytes
        return plan if freed >= shortfall else []

    async def _move(self, slot: Slot, target: str) -> None:
        """The loader's move, in a worker thread. Only reached with a host tier, and the host
        budget is 0 for a loader without one."""
        if (move := self._loader.move) is None:
            raise RuntimeError("a move between tiers, but the loader cannot move models")
        await anyio.to_thread.run_sync(move, slot.entry, slot.model, target)

    async def _execute(self, plan: list[tuple[Slot, str]], reason: str) -> None:
        """Run the moves of a plan; every victim is marked moving before the first await, so
        two plans never pick the same model."""
        moves = []
        for slot, target in plan:
            slot.target = target
            slot.moving = asyncio.ensure_future(self._move_out(slot, target, reason))
            moves.append(slot.moving)
        await asyncio.gather(*moves)

    async def _move_out(self, slot: Slot, target: str, reason: str) -> None:
        started = time.monotonic()
        # Alone: no load, move or run allocates meanwhile, so the bytes the allocator gives
        # back are this model's.
        alone = self._changing == 0 and not self._reservations
        self._changing, self._changes = self._changing + 1, self._changes + 1
        serial, runs = self._changes, self._runs
        self._disturb_runs()
        # Only bytes leaving this process's device allocation can leak: not a host-tier model's,
        # nor a daemon's (checked now: a dropped model is gone by the time it is verified).
        before = (self.memory.allocated() if alone and slot.tier == "device"
                  and not self._loader.external(slot.model) else None)
        freed = slot.bytes
        try:
            if target == "host":
                await self._make_host_room(slot)
                await self._move(slot, "host")
                slot.tier, slot.demotions = "host", slot.demotions + 1
                metrics.CACHE_DEMOTIONS.labels(slot.entry.id).inc()
            else:
                await self._drop(slot)
        except Exception:
            # A pinned model stays where it is rather than being dropped.
            log.warning("moving %s to %s failed", slot.entry.id, target, exc_info=True)
            slot.target = None  # it no longer claims room there (another demotion may fit)
            if not slot.pinned:
                await self._drop(slot)
        finally:
            slot.target, slot.moving = None, None
            self._changing -= 1
        await anyio.to_thread.run_sync(self._loader.release)
        seconds = time.monotonic() - started
        if slot.tier != "device":  # not a pinned model whose demotion failed
            metrics.EVICTION_SECONDS.labels(slot.tier).observe(seconds)
        event({"host": "demote", "none": "evict"}.get(slot.tier, "move_failed"),
              model=slot.entry.id, bytes=freed, seconds=f"{seconds:.3f}",
              reason=reason.replace(" ", "_"))
        # Not when a pinned model's demotion failed (it freed nothing), nor when another
        # load, move or run overlapped this one (their bytes would count as this one's).
        if slot.tier != "device" and (self._changes, self._runs) == (serial, runs) \
                and not self._reservations:
            self._verify_freed(slot, before, freed)
        if slot.tier == "none" and slot.idle:
            self._forget(slot)
        self._notify()

    async def _drop(self, slot: Slot) -> None:
        model, slot.model = slot.model, None
        slot.tier = "none"
        metrics.CACHE_EVICTIONS.labels(slot.entry.id).inc()
        try:  # a daemon that is already gone has nothing left to free
            await anyio.to_thread.run_sync(self._loader.unload, model)
        except Exception:
            log.warning("unloading %s failed", slot.entry.id, exc_info=True)
        parts = [weakref.ref(part) for part in walk(model)]
        del model
        # Only tensors caught in a reference cycle need a collection: a full one holds the
        # GIL for a few hundred ms, which /health and every other request would feel.
        if any(part() is not None for part in parts):
            await anyio.to_thread.run_sync(gc.collect)

    async def _make_host_room(self, incoming: Slot) -> None:
        """Drop idle host-tier models, least recently used first, until `incoming` (already
        counted there while it moves) fits."""
        def fits() -> bool:
            return self.tier_bytes("host") <= self.host_budget

        victims = sorted((s for s in self._slots.values()
                          if s.tier == "host" and s.idle and not s.pinned),
                         key=lambda s: s.last_used)
        for victim in victims:
            if fits():
                return
            if not (victim.idle and victim.tier == "host"):  # taken meanwhile (a promotion)
                continue
            victim.target, victim.moving = "none", asyncio.get_running_loop().create_future()
            try:
                await self._drop(victim)
            finally:
                victim.moving.set_result(None)
                victim.target, victim.moving = None, None
            event("evict", model=victim.entry.id, bytes=victim.bytes, tier="host")
            self._forget(victim)
        if not fits():
            raise MemoryError("host tier full")

    def _verify_freed(self, slot: Slot, before: int | None, expected: int) -> None:
        """An unload that did not give its memory back leaves less for everyone: count the
        shortfall against the budget until a later unload finds it returned."""
        after = self.memory.allocated()
        if before is None or after is None or self._loader.external(slot.model):
            return
        shortfall = max(0, expected - (before - after))
        if shortfall > expected // 20:
            self.leaked += shortfall
            metrics.LEAKED_BYTES.inc(shortfall)
            log.warning("cache event=leak model=%s expected=%d returned=%d", slot.entry.id,
                        expected, before - after)
        elif before - after > expected and self.leaked:
            self.leaked = max(0, self.leaked - (before - after - expected))

    async def evict_idle(self) -> None:
        """Move every idle, unpinned model off the device (after an out-of-memory error)."""
        plan = [(s, "host" if self._demotable(s) else "none") for s in self._slots.values()
                if s.tier == "device" and s.idle and not s.pinned]
        if plan:
            await self._execute(plan, reason="out of memory")
        # The failed run's tensors may hang on its traceback's cycles.
        await anyio.to_thread.run_sync(gc.collect)
        await anyio.to_thread.run_sync(self._loader.release)

    async def close(self) -> None:
        """Drop every idle model, pinned or not (the process is shutting down)."""
        for slot in self._slots.values():
            slot.pinned = False
        plan = [(s, "none") for s in self._slots.values() if s.tier != "none" and s.idle]
        if plan:
            await self._execute(plan, reason="shutdown")
        log.info("cache event=closed models=%d", len(plan))

    async def rebalance(self) -> None:
        """After others took device memory: move idle models out until the budget holds."""
        before = self.foreign
        self.refresh()
        if self.foreign < before:
            self._notify()  # others gave memory back: wake the requests waiting for room
        if self.free < 0 and (plan := self._plan(-self.free, keep=None)):
            await self._execute(plan, reason="foreign memory")
        elif self.free < 0:
            # Not even every idle model out restores the budget: move them all anyway.
            plan = [(s, "host" if self._demotable(s) else "none") for s in self._slots.values()
                    if s.tier == "device" and s.idle and (not s.pinned or self._demotable(s))]
            if plan:
                await self._execute(plan, reason="foreign memory")
            log.warning("cache event=over_budget free=%d: busy models hold the rest", self.free)

    async def _restore_pinned(self) -> None:
        """Demoted pinned models come back when they fit without moving anything."""
        try:
            for slot in [s for s in self._slots.values() if s.pinned and s.tier == "host"]:
                if (slot.idle and self._device_idle() and slot.bytes <= self.free
                        and not self._load_lock.locked()):
                    slot.moving = asyncio.ensure_future(self._bring(slot))
                    await asyncio.shield(slot.moving)
        except Exception:
            log.warning("restoring a pinned model failed", exc_info=True)
        finally:
            self._restoring = None


class TooLarge(FieldError):
    """A run that could not fit even with every other model moved out: 422, with the module's
    account of the largest request that would (`hint`) when it has one."""

    def __init__(self, model_id: str, nbytes: int, largest: int, hint: str = ""):
        super().__init__(
            "model_id",
            f"this request needs about {nbytes >> 20} MiB of working memory beside {model_id}; "
            f"at most {largest >> 20} MiB fits on this device. "
            + (hint or "Ask for a smaller size or fewer outputs."))
        self.nbytes, self.largest = nbytes, largest


async def _until(waitable: Any, deadline: float | None, model: str, what: str,
                 retry_after: float) -> None:
    """Await `waitable` until the request's deadline; past it the request gives up its place
    with a 503 (whatever it waited on goes on for the others)."""
    if deadline is None:
        await waitable
        return
    remaining = deadline - time.monotonic()
    try:
        await asyncio.wait_for(waitable, max(0.0, remaining))
    except TimeoutError:
        raise Busy(model, BusyReason.DEADLINE, f"{what}; the request's queue deadline passed",
                   retry_after=max(1, math.ceil(retry_after))) from None
