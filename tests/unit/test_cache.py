"""runner.cache.ModelCache with a fake loader: budget, LRU eviction, pinning, shared loads."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

import runner.cache
from runner.cache import Loader, ModelCache
from runner.errors import FieldError, Unavailable
from runner.registry import ModelEntry


@pytest.fixture(autouse=True)
def cheap_gc(monkeypatch):
    """Eviction runs gc.collect(), ~50 ms with torch and fastapi imported; the cache's own
    gc is replaced so traces with dozens of evictions stay fast."""
    calls = []
    monkeypatch.setattr(runner.cache, "gc", SimpleNamespace(collect=lambda: calls.append(1)))
    return calls


def entry(name: str, pipeline: str = "p") -> ModelEntry:
    return ModelEntry(id=f"test/{name}", kind="fake", pipeline=pipeline)


@dataclass(eq=False)
class FakeModel:
    id: str
    nbytes: int


class FakeLoader:
    """Sizes by entry id; optional per-model gates that block load() in its worker thread."""

    def __init__(self, sizes: dict[str, int], measured: dict[str, int] | None = None):
        self.sizes = {f"test/{k}": v for k, v in sizes.items()}
        self.measured = {f"test/{k}": v for k, v in (measured or {}).items()}
        self.loads: Counter[str] = Counter()
        self.releases = 0
        self.failing: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.on_release = lambda: None

    def block(self, name: str) -> tuple[threading.Event, threading.Event]:
        gate, started = threading.Event(), threading.Event()
        self.gates[f"test/{name}"] = gate
        self.started[f"test/{name}"] = started
        return gate, started

    def load(self, e: ModelEntry) -> FakeModel:
        self.loads[e.id] += 1
        if e.id in self.started:
            self.started[e.id].set()
        if e.id in self.gates:
            assert self.gates[e.id].wait(5), "test never opened the gate"
        if e.id in self.failing:
            raise RuntimeError(f"broken checkpoint {e.id}")
        return FakeModel(e.id, self.measured.get(e.id, self.sizes[e.id]))

    def estimate(self, e: ModelEntry) -> int:
        return self.sizes[e.id]

    def measure(self, model: FakeModel) -> int:
        return model.nbytes

    def release(self) -> None:
        self.releases += 1
        self.on_release()

    def loader(self) -> Loader:
        return Loader(load=self.load, estimate=self.estimate, measure=self.measure,
                      release=self.release)


async def touch(cache: ModelCache, e: ModelEntry):
    async with cache.use(e) as model:
        return model


def ids(cache: ModelCache) -> set[str]:
    return {d["id"] for d in cache.describe()}


async def wait_for_thread_event(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the load never started")


# -- admission and eviction ---------------------------------------------------------------------

def test_model_that_fits_loads_beside_others():
    fake = FakeLoader({"a": 40, "b": 40})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        a = await touch(cache, entry("a"))
        b = await touch(cache, entry("b"))
        assert (a.id, b.id) == ("test/a", "test/b")
        assert cache.is_ready(entry("a")) and cache.is_ready(entry("b"))
        assert cache.resident_bytes == 80
        assert fake.releases == 0
        # A warm model is a hit: no second load.
        assert await touch(cache, entry("a")) is a
        assert fake.loads == Counter({"test/a": 1, "test/b": 1})

    asyncio.run(main())


@pytest.mark.parametrize("recent, victim", [("a", "b"), ("b", "a")])
def test_over_budget_evicts_least_recently_used_idle_model(recent, victim, cheap_gc):
    fake = FakeLoader({"a": 40, "b": 40, "c": 40})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await touch(cache, entry("a"))
        await touch(cache, entry("b"))
        await touch(cache, entry(recent))  # the other one is now least recently used
        await touch(cache, entry("c"))
        assert not cache.is_ready(entry(victim))
        assert cache.is_ready(entry(recent)) and cache.is_ready(entry("c"))
        assert ids(cache) == {f"test/{recent}", "test/c"}
        assert cache.resident_bytes == 80
        assert fake.releases == 1 and len(cheap_gc) == 1
        # The evicted model comes back with a fresh load.
        await touch(cache, entry(victim))
        assert fake.loads[f"test/{victim}"] == 2

    asyncio.run(main())


def test_eviction_frees_only_as_much_as_needed():
    fake = FakeLoader({"a": 30, "b": 30, "c": 30, "d": 40})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        for name in "abc":
            await touch(cache, entry(name))
        await touch(cache, entry("d"))  # free 10, needs 40: one 30-byte eviction is enough
        assert ids(cache) == {"test/b", "test/c", "test/d"}
        assert fake.releases == 1

    asyncio.run(main())


def test_model_in_use_is_never_evicted():
    fake = FakeLoader({"a": 60, "b": 60})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        async with cache.use(entry("a")) as a:
            with pytest.raises(Unavailable) as info:
                await touch(cache, entry("b"))
            assert cache.is_ready(entry("a"))
            assert a.id == "test/a"
        assert info.value.status_code == 503
        assert int(info.value.headers["Retry-After"]) >= 1
        assert ids(cache) == {"test/a"}
        assert fake.releases == 0
        assert fake.loads["test/b"] == 0  # refused before any weights were read
        # Once a is idle, b evicts it.
        await touch(cache, entry("b"))
        assert ids(cache) == {"test/b"}

    asyncio.run(main())


def test_pinned_model_is_never_evicted():
    fake = FakeLoader({"a": 60, "b": 30, "c": 30})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await cache.pin(entry("a"))  # least recently used from here on
        await touch(cache, entry("b"))
        await touch(cache, entry("c"))
        assert cache.is_ready(entry("a"))
        assert ids(cache) == {"test/a", "test/c"}
        (a,) = [d for d in cache.describe() if d["id"] == "test/a"]
        assert a["pinned"] is True and a["state"] == "ready"
        assert fake.loads["test/a"] == 1

    asyncio.run(main())


def test_model_larger_than_budget_minus_pinned_is_422():
    fake = FakeLoader({"a": 60, "big": 50})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await cache.pin(entry("a"))
        with pytest.raises(FieldError) as info:
            await touch(cache, entry("big"))
        assert info.value.status_code == 422
        assert info.value.field == "model_id"
        assert "test/big" in info.value.msg
        assert cache.is_ready(entry("a"))
        assert ids(cache) == {"test/a"}
        assert fake.loads["test/big"] == 0

    asyncio.run(main())


def test_model_larger_than_whole_budget_is_422_without_pins():
    fake = FakeLoader({"big": 101})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        with pytest.raises(FieldError):
            await touch(cache, entry("big"))

    asyncio.run(main())


def test_never_fitting_model_does_not_evict_idle_models():
    fake = FakeLoader({"a": 60, "b": 20, "big": 50})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await cache.pin(entry("a"))
        await touch(cache, entry("b"))
        with pytest.raises(FieldError):
            await touch(cache, entry("big"))
        assert cache.is_ready(entry("b")), "idle b was evicted although big could never load"
        assert fake.releases == 0

    asyncio.run(main())


def test_refused_load_does_not_evict_idle_models():
    fake = FakeLoader({"busy": 50, "idle": 30, "c": 60})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await touch(cache, entry("idle"))
        async with cache.use(entry("busy")):
            with pytest.raises(Unavailable):
                await touch(cache, entry("c"))
            assert cache.is_ready(entry("idle")), "idle was evicted although c was refused"

    asyncio.run(main())


# -- concurrency ---------------------------------------------------------------------------------

def test_concurrent_uses_of_a_cold_model_share_one_load():
    fake = FakeLoader({"a": 10})
    gate, started = fake.block("a")

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        tasks = [asyncio.ensure_future(touch(cache, entry("a"))) for _ in range(8)]
        await wait_for_thread_event(started)
        await asyncio.sleep(0.01)  # let every task reach the shared load
        (slot,) = cache.describe()
        assert slot["state"] == "loading" and slot["in_flight"] == 8
        gate.set()
        models = await asyncio.gather(*tasks)
        assert fake.loads["test/a"] == 1
        assert all(m is models[0] for m in models)
        assert cache.describe()[0]["in_flight"] == 0

    asyncio.run(main())


def test_warm_request_completes_during_a_slow_cold_load():
    fake = FakeLoader({"warm": 10, "cold": 10})
    gate, started = fake.block("cold")

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        warm = await touch(cache, entry("warm"))
        cold_task = asyncio.ensure_future(touch(cache, entry("cold")))
        try:
            await wait_for_thread_event(started)
            got = await asyncio.wait_for(touch(cache, entry("warm")), timeout=1)
            assert got is warm
            assert not cold_task.done()
            states = {d["id"]: d["state"] for d in cache.describe()}
            assert states == {"test/warm": "ready", "test/cold": "loading"}
        finally:
            gate.set()
        cold = await asyncio.wait_for(cold_task, timeout=5)
        assert cold.id == "test/cold"

    asyncio.run(main())


def test_cancelled_waiter_does_not_cancel_the_shared_load():
    fake = FakeLoader({"a": 10})
    gate, started = fake.block("a")

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        first = asyncio.ensure_future(touch(cache, entry("a")))
        second = asyncio.ensure_future(touch(cache, entry("a")))
        await wait_for_thread_event(started)
        first.cancel()
        await asyncio.sleep(0)
        gate.set()
        model = await asyncio.wait_for(second, timeout=5)
        assert model.id == "test/a"
        assert first.cancelled()
        assert fake.loads["test/a"] == 1
        assert cache.describe()[0]["in_flight"] == 0

    asyncio.run(main())


def test_failed_load_reaches_every_waiter_and_is_retried_later():
    fake = FakeLoader({"a": 10, "ok": 10})
    fake.failing.add("test/a")
    gate, started = fake.block("a")

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await touch(cache, entry("ok"))
        tasks = [asyncio.ensure_future(touch(cache, entry("a"))) for _ in range(3)]
        await wait_for_thread_event(started)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert all("broken checkpoint" in str(r) for r in results)
        assert fake.loads["test/a"] == 1
        assert ids(cache) == {"test/ok"}
        assert not cache.is_ready(entry("a"))
        assert cache.resident_bytes == 10
        # The next request tries again, and this time the checkpoint loads.
        fake.failing.clear()
        model = await touch(cache, entry("a"))
        assert model.id == "test/a"
        assert fake.loads["test/a"] == 2
        (a,) = [d for d in cache.describe() if d["id"] == "test/a"]
        assert a["state"] == "ready" and a["loads"] == 1

    asyncio.run(main())


# -- what the cache reports ----------------------------------------------------------------------

def test_describe_and_resident_bytes_use_measured_size():
    fake = FakeLoader({"a": 40, "b": 25}, measured={"a": 30})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        assert cache.describe() == [] and cache.resident_bytes == 0
        await cache.pin(entry("a"))
        async with cache.use(entry("b")):
            by_id = {d["id"]: d for d in cache.describe()}
            assert by_id["test/b"]["in_flight"] == 1
        by_id = {d["id"]: d for d in cache.describe()}
        a = by_id["test/a"]
        assert set(a) == {"id", "pipeline", "state", "tier", "pinned", "in_flight",
                          "estimated_bytes", "measured_bytes", "running_bytes", "loads", "hits",
                          "demotions", "load_seconds", "idle_seconds"}
        assert a == {**a, "id": "test/a", "pipeline": "p", "state": "ready", "tier": "device",
                     "pinned": True, "in_flight": 0, "estimated_bytes": 40,
                     "measured_bytes": 30, "loads": 1, "hits": 0, "demotions": 0,
                     "running_bytes": 0}
        assert isinstance(a["load_seconds"], float) and a["load_seconds"] >= 0
        assert by_id["test/b"]["pinned"] is False and by_id["test/b"]["in_flight"] == 0
        assert cache.resident_bytes == 30 + 25

    asyncio.run(main())


def test_same_id_in_two_pipelines_is_two_slots():
    fake = FakeLoader({"a": 10})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await touch(cache, entry("a", pipeline="p"))
        await touch(cache, entry("a", pipeline="q"))
        assert ModelCache.key(entry("a", "p")) != ModelCache.key(entry("a", "q"))
        assert sorted(d["pipeline"] for d in cache.describe()) == ["p", "q"]
        assert fake.loads["test/a"] == 2
        assert cache.resident_bytes == 20

    asyncio.run(main())


# -- random traces -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_random_trace_keeps_invariants(seed):
    rng = random.Random(seed)
    budget = 100
    names = [f"m{i}" for i in range(6)]
    sizes = {name: rng.randint(10, 90) for name in names}
    sizes["pinned"] = 20
    fake = FakeLoader(sizes)
    held: list[tuple[ModelEntry, FakeModel]] = []
    violations: list[str] = []
    outcomes: Counter[str] = Counter()

    async def main():
        cache = ModelCache(fake.loader(), budget=budget)

        def check_held(when: str) -> None:
            for e, model in held:
                slot = cache._slots.get(ModelCache.key(e))
                if slot is None or slot.tier != "device" or slot.model is not model:
                    violations.append(f"{when}: {e.id} evicted while in use")

        fake.on_release = lambda: check_held("release")
        await cache.pin(entry("pinned"))

        async def one_use(e: ModelEntry, hold: int) -> None:
            try:
                async with cache.use(e) as model:
                    assert model.id == e.id
                    held.append((e, model))
                    try:
                        for _ in range(hold):
                            await asyncio.sleep(0)
                            check_held("holding")
                    finally:
                        held.remove((e, model))
            except FieldError:
                outcomes["422"] += 1
                assert sizes[e.id.split("/")[1]] > budget - sizes["pinned"]
                return
            except Unavailable as exc:
                outcomes["503"] += 1
                assert int(exc.headers["Retry-After"]) >= 1
                return
            outcomes["ok"] += 1

        for _ in range(150):
            batch = [one_use(entry(rng.choice(names)), rng.randint(0, 6))
                     for _ in range(rng.randint(1, 4))]
            await asyncio.gather(*batch)
            assert cache.resident_bytes <= budget
            assert cache.is_ready(entry("pinned"))
            assert all(d["in_flight"] == 0 for d in cache.describe())
            assert not violations, violations
            ready = {d["id"] for d in cache.describe() if d["state"] == "ready"}
            assert sum(sizes[i.split("/")[1]] for i in ready) == cache.resident_bytes

    asyncio.run(main())
    assert outcomes["ok"] > 0
    assert fake.releases > 0  # the trace did exercise eviction
    assert fake.loads["test/pinned"] == 1


def test_evict_idle_keeps_pinned_and_in_use_models():
    fake = FakeLoader({"pinned": 10, "busy": 10, "idle": 10})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        await cache.pin(entry("pinned"))
        await touch(cache, entry("idle"))
        async with cache.use(entry("busy")):
            await cache.evict_idle()
            assert ids(cache) == {"test/pinned", "test/busy"}
        assert fake.releases >= 1

    asyncio.run(main())


def test_evicted_models_are_unloaded_first():
    fake = FakeLoader({"a": 60, "b": 60})
    unloaded = []

    async def main():
        loader = fake.loader()
        loader.unload = lambda model: unloaded.append(model.id)
        cache = ModelCache(loader, budget=100)
        await touch(cache, entry("a"))
        await touch(cache, entry("b"))

    asyncio.run(main())
    assert unloaded == ["test/a"]
