"""runner.cache.ModelCache on a fake device (tests/support/fake_device.py): budget, eviction
and the host tier, pinning, shared loads, working-memory reservations, foreign memory, leaks."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from runner.cache import ModelCache, TooLarge
from runner.errors import FieldError, Unavailable
from runner.registry import ModelEntry
from tests.support import fake_device
from tests.support.fake_device import (
    FakeDevice,
    FakeLoader,
    FakeModel,
    entry,
    eventually,
    run,
    tiers,
    touch,
    wait_for_thread_event,
)
from tests.support.helpers import HANG_S, is_ready

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(autouse=True)
def cheap_gc():
    """The cache's gc.collect() (~50 ms with torch imported) is counted instead of run."""
    with fake_device.cheap_gc() as calls:
        yield calls


def ids(cache: ModelCache) -> set[str]:
    return {d["id"] for d in cache.describe()}


# -- admission and eviction ---------------------------------------------------------------------

def test_model_that_fits_loads_beside_others():
    fake = FakeLoader({"a": 40, "b": 40})

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        a = await touch(cache, entry("a"))
        b = await touch(cache, entry("b"))
        assert (a.id, b.id) == ("test/a", "test/b")
        assert is_ready(cache, entry("a")) and is_ready(cache, entry("b"))
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
        assert not is_ready(cache, entry(victim))
        assert is_ready(cache, entry(recent)) and is_ready(cache, entry("c"))
        assert ids(cache) == {f"test/{recent}", "test/c"}
        assert cache.resident_bytes == 80
        assert fake.releases == 1
        assert not cheap_gc  # no full collection: nothing of the dropped model was left
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
            assert is_ready(cache, entry("a"))
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
        assert is_ready(cache, entry("a"))
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
        assert is_ready(cache, entry("a"))
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
        assert is_ready(cache, entry("b")), "idle b was evicted although big could never load"
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
            assert is_ready(cache, entry("idle")), "idle was evicted although c was refused"

    asyncio.run(main())


# -- concurrency ---------------------------------------------------------------------------------

def test_concurrent_uses_of_a_cold_model_share_one_load():
    fake = FakeLoader({"a": 10})
    gate, started = fake.block("a")

    async def main():
        cache = ModelCache(fake.loader(), budget=100)
        tasks = [asyncio.ensure_future(touch(cache, entry("a"))) for _ in range(8)]
        await wait_for_thread_event(started)
        # every task reaches the shared load
        await eventually(lambda: cache.describe()[0]["in_flight"] == 8)
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
            # the cold load waits for the gate: a warm request behind it would never come
            got = await asyncio.wait_for(touch(cache, entry("warm")), timeout=HANG_S)
            assert got is warm
            assert not cold_task.done()
            states = {d["id"]: d["state"] for d in cache.describe()}
            assert states == {"test/warm": "ready", "test/cold": "loading"}
        finally:
            gate.set()
        cold = await asyncio.wait_for(cold_task, timeout=HANG_S)
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
        model = await asyncio.wait_for(second, timeout=HANG_S)
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
        assert not is_ready(cache, entry("a"))
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
                          "demotions", "load_seconds", "idle_seconds", "working_memory"}
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
            assert is_ready(cache, entry("pinned"))
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


# -- the fake device: victims, tiers, pins -------------------------------------------------------

def by_id(cache: ModelCache) -> dict[str, dict]:
    return {d["id"].removeprefix("test/"): d for d in cache.describe()}


def test_model_fits_beside_others_and_the_foreign_bytes():
    device = FakeDevice(total=120, foreign=20)
    fake = FakeLoader({"a": 40, "b": 40, "c": 10}, device=device)

    async def main():
        cache = fake.cache(budget=100)
        await touch(cache, entry("a"))
        await touch(cache, entry("b"))  # 20 foreign + 40 + 40: exactly the budget
        assert tiers(cache) == {"a": "device", "b": "device"}
        assert cache.foreign == 20 and cache.budget == 80 and cache.free == 0
        await touch(cache, entry("c"))  # one of them makes room
        assert cache.resident_bytes <= cache.budget
        assert tiers(cache) == {"b": "device", "c": "device"}
        assert fake.unloads == Counter({"test/a": 1})
        assert device.allocated() == cache.resident_bytes == 50

    asyncio.run(main())


def test_victim_is_the_cheapest_to_reload_per_byte_not_the_least_recently_used():
    # Measured reloads: slow 0.2 s for 2 units (0.1 s per unit), mid and new 0.2 s for one,
    # fast about 0 s.
    fake = FakeLoader({"slow": 2 * MiB, "mid": MiB, "fast": MiB, "new": MiB},
                      load_seconds={"slow": 0.2, "mid": 0.2, "new": 0.2})

    async def main():
        cache = fake.cache(budget=4 * MiB)
        await touch(cache, entry("slow"))
        await touch(cache, entry("mid"))
        await touch(cache, entry("fast"))  # most recently used, cheapest to reload
        await touch(cache, entry("new"))
        assert set(tiers(cache)) == {"slow", "mid", "new"}
        await touch(cache, entry("fast"))  # mid is the least recently used, slow per byte
        assert set(tiers(cache)) == {"mid", "new", "fast"}, "slow is cheapest per byte"

    asyncio.run(main())


def test_demoting_to_the_host_tier_is_preferred_over_dropping():
    # Promoting 1 GiB from the host tier is estimated at 0.125 s; reloading the immovable
    # model measured 0.2 s.
    fake = FakeLoader({"movable": GiB, "pinned_to_gpu": GiB, "c": GiB}, host=True,
                      immovable={"pinned_to_gpu"}, load_seconds={"pinned_to_gpu": 0.2})

    async def main():
        cache = fake.cache(budget=2 * GiB, host_budget=4 * GiB)
        await touch(cache, entry("pinned_to_gpu"))
        moved = await touch(cache, entry("movable"))  # most recently used
        await touch(cache, entry("c"))
        assert tiers(cache) == {"movable": "host", "pinned_to_gpu": "device", "c": "device"}
        assert fake.moves == [("test/movable", "host")] and not fake.unloads
        assert by_id(cache)["movable"]["state"] == "demoted"
        assert by_id(cache)["movable"]["demotions"] == 1
        # Coming back is a promotion of the same model, not a load.
        assert await touch(cache, entry("movable")) is moved
        assert fake.loads["test/movable"] == 1
        assert fake.moves[-1] == ("test/movable", "device")
        assert tiers(cache)["movable"] == "device"
        assert cache.tier_bytes("host") <= cache.host_budget

    asyncio.run(main())


def test_busy_model_is_never_moved_for_a_load_or_a_reservation():
    fake = FakeLoader({"busy": 40, "idle": 30, "c": 30}, host=True)

    async def main():
        cache = fake.cache(budget=100, host_budget=100)
        await touch(cache, entry("idle"))
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("busy"), 20, hold=hold))
        await eventually(lambda: cache.running_bytes == 20)
        busy = cache.resident(entry("busy"))
        await touch(cache, entry("c"))  # needs 30 of 10 free: idle goes, busy stays
        assert tiers(cache) == {"busy": "device", "idle": "host", "c": "device"}
        await cache.evict_idle()
        await cache.rebalance()
        assert cache.resident(entry("busy")) is busy
        assert ("test/busy", "host") not in fake.moves and not fake.unloads["test/busy"]
        hold.set()
        assert await task is busy

    asyncio.run(main())


def test_pinned_model_is_demoted_only_when_nothing_else_frees_enough_and_comes_back():
    fake = FakeLoader({"pinned": 50, "idle": 20, "r": 20}, host=True)

    async def main():
        cache = fake.cache(budget=100, host_budget=100)
        await cache.pin(entry("pinned"))
        await touch(cache, entry("idle"))
        # free 10, needs 20: the idle model is enough, the pinned one stays.
        await asyncio.wait_for(run(cache, entry("r"), 20), HANG_S)
        assert tiers(cache) == {"pinned": "device", "idle": "host", "r": "device"}
        # needs 70 beside r: only with the pinned model out of the way.
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("r"), 70, hold=hold))
        await eventually(lambda: cache.running_bytes == 70)
        assert tiers(cache)["pinned"] == "host"
        assert by_id(cache)["pinned"]["pinned"] is True
        assert cache.resident_bytes + cache.running_bytes <= cache.budget
        hold.set()
        await asyncio.wait_for(task, HANG_S)
        # Once idle and there is room, it comes back on its own.
        await eventually(lambda: tiers(cache)["pinned"] == "device")
        assert is_ready(cache, entry("pinned"))
        assert fake.loads["test/pinned"] == 1 and not fake.unloads["test/pinned"]

    asyncio.run(main())


def test_pinned_model_is_never_dropped():
    device = FakeDevice()
    fake = FakeLoader({"pinned": 50, "idle": 20, "r": 20}, device=device)  # no host tier

    async def main():
        cache = fake.cache(budget=100)
        await cache.pin(entry("pinned"))
        await touch(cache, entry("idle"))
        with pytest.raises(TooLarge):  # 60 beside r can only fit with the pinned model out
            await run(cache, entry("r"), 60)
        await cache.evict_idle()
        device.foreign = 60
        await cache.rebalance()
        assert tiers(cache)["pinned"] == "device" and is_ready(cache, entry("pinned"))
        assert not fake.unloads["test/pinned"]

    asyncio.run(main())


def test_ten_concurrent_cold_requests_share_one_load():
    fake = FakeLoader({"a": 10})
    gate, started = fake.block("a")

    async def main():
        cache = fake.cache(budget=100)
        tasks = [asyncio.ensure_future(run(cache, entry("a"), 5)) for _ in range(10)]
        await wait_for_thread_event(started)
        await eventually(lambda: by_id(cache)["a"]["in_flight"] == 10)
        assert by_id(cache)["a"]["state"] == "loading" and by_id(cache)["a"]["in_flight"] == 10
        gate.set()
        models = await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
        assert fake.loads["test/a"] == 1 and all(m is models[0] for m in models)
        assert by_id(cache)["a"]["in_flight"] == 0 and cache.running_bytes == 0

    asyncio.run(main())


# -- working memory ------------------------------------------------------------------------------

def test_reservation_waits_for_a_running_one_to_end():
    fake = FakeLoader({"a": 20})

    async def main():
        cache = fake.cache(budget=100)
        hold = asyncio.Event()
        first = asyncio.ensure_future(run(cache, entry("a"), 60, hold=hold))
        await eventually(lambda: cache.running_bytes == 60)
        second = asyncio.ensure_future(run(cache, entry("a"), 50))
        await asyncio.sleep(0.05)
        assert not second.done() and cache.running_bytes == 60
        hold.set()
        await asyncio.wait_for(asyncio.gather(first, second), HANG_S)
        assert cache.running_bytes == 0

    asyncio.run(main())


def test_reservation_past_its_deadline_is_503_with_retry_after():
    fake = FakeLoader({"a": 20})

    async def main():
        cache = fake.cache(budget=100)
        hold = asyncio.Event()
        first = asyncio.ensure_future(run(cache, entry("a"), 60, hold=hold))
        await eventually(lambda: cache.running_bytes == 60)
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:  # `first` never ends: only the deadline can
            await asyncio.wait_for(run(cache, entry("a"), 50, deadline=time.monotonic() + 0.1),
                                   HANG_S)
        assert time.monotonic() - started > 0.05  # it waited for room until then
        assert info.value.status_code == 503
        assert int(info.value.headers["Retry-After"]) >= 1
        assert "deadline" in info.value.msg
        assert cache.running_bytes == 60 and by_id(cache)["a"]["in_flight"] == 1
        hold.set()
        await first
        assert by_id(cache)["a"]["in_flight"] == 0

    asyncio.run(main())


def test_too_large_working_memory_is_422_naming_what_fits_with_the_hint():
    fake = FakeLoader({"pinned": 300 * MiB, "a": 200 * MiB, "idle": 100 * MiB})
    fractions = []

    def hint(fraction: float) -> str:
        fractions.append(fraction)
        return "Try at most 512x512."

    async def main():
        cache = fake.cache(budget=1000 * MiB)
        await cache.pin(entry("pinned"))
        await touch(cache, entry("idle"))
        with pytest.raises(TooLarge) as info:
            await run(cache, entry("a"), 800 * MiB, hint=hint)
        err = info.value
        assert isinstance(err, FieldError) and err.status_code == 422 and err.field == "model_id"
        assert "800 MiB" in err.msg and "at most 500 MiB fits" in err.msg
        assert err.msg.endswith("Try at most 512x512.")
        assert err.largest == 500 * MiB and fractions == [500 / 800]
        assert "idle" in tiers(cache) and not fake.unloads, "a refused run moved nothing"
        # Without a hint the message says what to do.
        with pytest.raises(TooLarge, match="smaller size"):
            await run(cache, entry("a"), 800 * MiB)

    asyncio.run(main())


def test_oom_bumps_the_learned_peak_and_evict_idle_moves_idle_models_out():
    fake = FakeLoader({"pinned": 10, "a": 10, "idle": 10, "idle2": 10}, host=True)

    async def main():
        cache = fake.cache(budget=100, host_budget=10)
        await cache.pin(entry("pinned"))
        await touch(cache, entry("idle"))
        await touch(cache, entry("idle2"))
        async with cache.use(entry("a")):
            async with cache.reserve(entry("a"), 20) as r:
                assert r.nbytes == 20
                cache.oom(entry("a"), r)
                await cache.evict_idle()
        assert cache.working_bytes(entry("a"), 20) == (int(30 * 1.1), r.bucket)
        assert tiers(cache)["pinned"] == "device" and tiers(cache)["a"] == "device"
        # One idle model fits the host tier, the other is dropped.
        assert sorted(t for n, t in tiers(cache).items() if n.startswith("idle")) == ["host"]
        assert sum(fake.unloads.values()) == 1

    asyncio.run(main())


def test_measured_peak_corrects_the_next_reservation():
    fake = FakeLoader({"a": 10}, peaks={"a": 30})

    async def main():
        cache = fake.cache(budget=1000)
        assert cache.working_bytes(entry("a"), 50) == (50, 6)
        await run(cache, entry("a"), 50)
        assert cache.working_bytes(entry("a"), 50) == (33, 6)  # the peak, with the margin
        # /models shows the last run's estimate against what it measured.
        (a,) = cache.describe()
        assert a["working_memory"] == {"estimated_bytes": 50, "reserved_bytes": 50,
                                       "measured_bytes": 30, "largest_ratio": 0.6}
        # Other sizes scale by the largest measured ratio (30/50).
        assert cache.working_bytes(entry("a"), 500) == (int(500 * 0.6 * 1.1), 9)
        # Overlapping runs do not learn: neither peak is their own.
        hold = asyncio.Event()
        tasks = [asyncio.ensure_future(run(cache, entry("a"), 400, hold=hold))
                 for _ in range(2)]
        await eventually(lambda: cache.running_bytes == 2 * int(400 * 0.6 * 1.1))
        hold.set()
        await asyncio.gather(*tasks)
        assert 9 not in cache._learned["p:test/a"].peaks

    asyncio.run(main())


def test_a_run_during_which_another_model_loads_does_not_learn_its_peak():
    """The device-wide peak of that run includes the loaded model's weights."""
    fake = FakeLoader({"a": 10, "b": 10}, peaks={"a": 30})

    async def main():
        cache = fake.cache(budget=1000)
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("a"), 50, hold=hold))
        await eventually(lambda: cache.running_bytes == 50)
        await touch(cache, entry("b"))
        hold.set()
        await task
        assert 6 not in cache._learned["p:test/a"].peaks
        await run(cache, entry("a"), 50)  # alone, it learns
        assert cache._learned["p:test/a"].peaks[6] == 30

    asyncio.run(main())


# -- foreign memory, leaks, daemons --------------------------------------------------------------

def test_foreign_growth_shrinks_the_budget_and_rebalance_moves_idle_models_out():
    device = FakeDevice(total=100)
    fake = FakeLoader({"busy": 30, "a": 20, "b": 20}, device=device, host=True)

    async def main():
        cache = fake.cache(budget=100, host_budget=100)
        await touch(cache, entry("a"))
        await touch(cache, entry("b"))
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("busy"), 10, hold=hold))
        await eventually(lambda: cache.running_bytes == 10)
        device.foreign = 30
        cache.refresh()
        assert cache.foreign == 30 and cache.budget == 70
        assert cache.summary()["foreign_bytes"] == 30
        await cache.rebalance()  # 80 on 70: one idle model is enough
        assert cache.resident_bytes + cache.running_bytes <= cache.budget
        assert sorted(tiers(cache).values()) == ["device", "device", "host"]
        device.foreign = 90  # nothing can make this fit: every idle model goes
        await cache.rebalance()
        assert tiers(cache) == {"busy": "device", "a": "host", "b": "host"}
        hold.set()
        await task

    asyncio.run(main())


def test_unload_that_leaks_is_counted_against_the_budget():
    device = FakeDevice()
    fake = FakeLoader({"leaky": 40, "b": 40, "c": 30, "d": 40}, device=device,
                      leaks={"leaky": 30})

    async def main():
        cache = fake.cache(budget=100)
        await touch(cache, entry("leaky"))
        await touch(cache, entry("b"))
        await touch(cache, entry("c"))  # evicts leaky, which keeps 30 of its 40
        assert cache.leaked == 30 and device.leaked == 30
        assert cache.budget == 70 and cache.summary()["leaked_bytes"] == 30
        assert cache.summary()["budget_bytes"] == 70
        assert tiers(cache) == {"b": "device", "c": "device"} and cache.free == 0
        await touch(cache, entry("d"))  # 40 of 70 with c beside it: b goes
        assert tiers(cache) == {"c": "device", "d": "device"}
        assert cache.leaked == 30  # b gave all of its bytes back
        device.foreign = 10
        await cache.rebalance()  # 70 on 60: c, the least recently used, goes
        assert tiers(cache) == {"d": "device"} and cache.free == 20

    asyncio.run(main())


def test_memory_a_run_allocates_during_an_eviction_is_not_a_leak():
    device = FakeDevice()
    fake = FakeLoader({"busy": 10, "x": 40, "y": 60}, device=device)

    async def main():
        cache = fake.cache(budget=100)
        await touch(cache, entry("x"))
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("busy"), 0, hold=hold))
        await eventually(lambda: bool(cache._reservations))
        gate, started = fake.block("x", "unload")
        load_y = asyncio.ensure_future(touch(cache, entry("y")))  # x has to go
        await wait_for_thread_event(started, "the unload")
        device.transient = 20  # the running request allocates meanwhile
        gate.set()
        await load_y
        assert tiers(cache) == {"busy": "device", "y": "device"}
        assert cache.leaked == 0
        hold.set()
        await task

    asyncio.run(main())


def test_external_model_is_dropped_not_demoted_and_is_not_foreign():
    device = FakeDevice(foreign=5)
    fake = FakeLoader({"ollama": 40, "b": 40}, device=device, host=True, external={"ollama"})

    async def main():
        cache = fake.cache(budget=100, host_budget=100)
        model = await touch(cache, entry("ollama"))
        assert device.others() == 45 and device.allocated() == 0
        cache.refresh()
        assert cache.foreign == 5, "the daemon holds our model: not foreign"
        assert cache.resident_bytes == 40
        await touch(cache, entry("b"))
        await cache.evict_idle()
        assert "ollama" not in tiers(cache) and fake.unloads["test/ollama"] == 1
        assert not [m for m in fake.moves if m[0] == "test/ollama"]
        assert model.tier == "gone"
        assert cache.leaked == 0, "a daemon's model freeing no local bytes is no leak"
        assert cache.budget == 95

    asyncio.run(main())


def test_full_host_tier_drops_its_least_recently_used_model():
    fake = FakeLoader({"a": 30, "b": 30, "c": 30, "d": 30}, host=True)

    async def main():
        cache = fake.cache(budget=30, host_budget=60)
        for name in "abcd":  # each load demotes the previous model
            await touch(cache, entry(name))
        assert tiers(cache) == {"b": "host", "c": "host", "d": "device"}
        assert fake.unloads == Counter({"test/a": 1})
        assert cache.tier_bytes("host") == 60 == cache.summary()["host_bytes"]
        assert cache.leaked == 0

    asyncio.run(main())


def test_operator_unload():
    fake = FakeLoader({"a": 30, "b": 30, "p": 30}, host=True)

    async def main():
        cache = fake.cache(budget=60, host_budget=60)
        await touch(cache, entry("a"))
        async with cache.use(entry("b")):
            assert await cache.unload(entry("b")) is False
        assert tiers(cache)["b"] == "device"
        await cache.pin(entry("p"))  # demotes a
        assert tiers(cache)["a"] == "host"
        assert await cache.unload(entry("a")) is True  # from the host tier
        assert await cache.unload(entry("p")) is True  # unpins
        assert await cache.unload(entry("never")) is True
        assert tiers(cache) == {"b": "device"}
        assert fake.unloads == Counter({"test/a": 1, "test/p": 1})
        assert cache.leaked == 0

    asyncio.run(main())


def test_summary_fields():
    device = FakeDevice(foreign=10)
    fake = FakeLoader({"a": 30}, device=device, host=True)

    async def main():
        cache = fake.cache(budget=100, host_budget=50)
        await touch(cache, entry("a"))
        hold = asyncio.Event()
        task = asyncio.ensure_future(run(cache, entry("a"), 20, hold=hold))
        await eventually(lambda: cache.running_bytes == 20)
        assert cache.summary() == {
            "budget_bytes": 90, "base_budget_bytes": 100, "foreign_bytes": 10,
            "leaked_bytes": 0, "resident_bytes": 30, "running_bytes": 20,
            "host_budget_bytes": 50, "host_bytes": 0}
        a = by_id(cache)["a"]
        assert a["running_bytes"] == 20 and a["in_flight"] == 1 and a["hits"] == 1
        hold.set()
        await task
        assert fake.cache(budget=100, host_budget=50).host_budget == 50
        assert FakeLoader({}).cache(budget=100, host_budget=50).host_budget == 0  # no move

    asyncio.run(main())


# -- regressions ---------------------------------------------------------------------------------

def test_reservation_waiting_for_foreign_memory_is_woken_when_it_is_given_back():
    device = FakeDevice(foreign=30)
    fake = FakeLoader({"a": 20}, device=device)

    async def main():
        cache = fake.cache(budget=100)
        hold = asyncio.Event()
        first = asyncio.ensure_future(run(cache, entry("a"), 30, hold=hold))
        await eventually(lambda: cache.running_bytes == 30)
        second = asyncio.ensure_future(run(cache, entry("a"), 40))  # 20 free of 70
        await asyncio.sleep(0.02)
        assert not second.done()
        device.foreign = 0
        await cache.rebalance()
        await asyncio.wait_for(second, HANG_S)  # not only once `first` ends: it never does
        assert not first.done()
        hold.set()
        await first

    asyncio.run(main())


def test_pinned_model_on_its_way_to_the_host_tier_is_not_counted_immovable():
    # A second run sized to fit once the pinned model is demoted was a 422 while the demotion
    # was in flight (the moving model counted against the host tier it was going to).
    fake = FakeLoader({"pinned": 50, "a": 10}, host=True)
    gate, started = fake.block("pinned", "move")

    async def main():
        cache = fake.cache(budget=100, host_budget=60)
        await cache.pin(entry("pinned"))
        hold = asyncio.Event()
        first = asyncio.ensure_future(run(cache, entry("a"), 60, hold=hold))
        await wait_for_thread_event(started, "the demotion")
        second = asyncio.ensure_future(run(cache, entry("a"), 45))
        await asyncio.sleep(0.02)
        assert not second.done(), second.exception() if second.done() else None
        gate.set()
        await eventually(lambda: cache.running_bytes == 60)  # both run, one after the other
        assert tiers(cache)["pinned"] == "host"
        hold.set()
        await asyncio.wait_for(asyncio.gather(first, second), HANG_S)
        await eventually(lambda: tiers(cache)["pinned"] == "device")

    asyncio.run(main())


def test_pinned_model_whose_demotion_fails_stays_and_is_no_leak():
    fake = FakeLoader({"pinned": 50, "a": 10}, host=True)
    fake.failing_moves.add("test/pinned")

    async def main():
        cache = fake.cache(budget=100, host_budget=60)
        await cache.pin(entry("pinned"))
        with pytest.raises(Unavailable):
            await run(cache, entry("a"), 60, deadline=time.monotonic() + 0.1)
        assert tiers(cache)["pinned"] == "device" and is_ready(cache, entry("pinned"))
        assert cache.leaked == 0 and cache.budget == 100

    asyncio.run(main())


def test_host_room_skips_a_victim_that_is_being_promoted():
    # Making host room for `a` drops x; meanwhile y, the next victim, is promoted by a request.
    # y must not be dropped under the promotion (it came back to the device with no model).
    fake = FakeLoader({"x": 20, "y": 30, "a": 40}, host=True)

    async def main():
        cache = fake.cache(budget=200, host_budget=60)
        await touch(cache, entry("x"))
        await touch(cache, entry("y"))
        await cache.evict_idle()
        assert tiers(cache) == {"x": "host", "y": "host"}
        await touch(cache, entry("a"))
        x_gate, x_started = fake.block("x", "unload")
        y_gate, y_started = fake.block("y", "move")
        evicting = asyncio.ensure_future(cache.evict_idle())  # a -> host: 90 of 60
        await wait_for_thread_event(x_started, "dropping x")
        using = asyncio.ensure_future(touch(cache, entry("y")))
        await wait_for_thread_event(y_started, "promoting y")
        x_gate.set()
        await asyncio.sleep(0.02)
        y_gate.set()
        y = await asyncio.wait_for(using, HANG_S)
        await asyncio.wait_for(evicting, HANG_S)
        assert y is not None and y.tier == "device" and cache.resident(entry("y")) is y
        assert not fake.unloads["test/y"] and not fake.errors
        assert "x" not in tiers(cache) and tiers(cache)["y"] == "device"
        assert cache.tier_bytes("host") <= cache.host_budget

    asyncio.run(main())


def test_two_waiting_requests_holding_what_the_other_needs_do_not_deadlock():
    # Each run fits beside its own model but not beside both: each request held its model
    # and waited for the other's to leave, until both deadlines passed (forever without one).
    fake = FakeLoader({"a": 43, "b": 35})

    async def main():
        cache = fake.cache(budget=100)
        hold = asyncio.Event()
        first = asyncio.ensure_future(run(cache, entry("a"), 1, hold=hold))
        await eventually(lambda: cache.running_bytes == 1)
        on_a = asyncio.ensure_future(run(cache, entry("a"), 57))
        on_b = asyncio.ensure_future(run(cache, entry("b"), 23))
        await asyncio.sleep(0.02)
        assert not on_a.done() and not on_b.done()  # waiting for the first run is right
        hold.set()
        done, _ = await asyncio.wait([first, on_a, on_b], timeout=HANG_S)
        assert len(done) == 3, "deadlocked"
        outcomes = sorted(type(t.exception()).__name__ if t.exception() else "ok"
                          for t in (on_a, on_b))
        assert outcomes in (["Busy", "ok"], ["ok", "ok"]), outcomes
        for t in (on_a, on_b):
            if t.exception() is not None:
                assert int(t.exception().headers["Retry-After"]) >= 1
        assert cache.running_bytes == 0 and all(d["in_flight"] == 0 for d in cache.describe())

    asyncio.run(main())


def test_victims_evicted_together_do_not_erase_a_leak():
    # Each of two concurrent evictions saw the other's bytes come back too ("more than
    # expected") and took it for the earlier leak being returned.
    device = FakeDevice()
    fake = FakeLoader({"leaky": 30, "a": 30, "b": 30, "big": 90}, device=device,
                      leaks={"leaky": 10})

    async def main():
        cache = fake.cache(budget=100)
        for name in ("leaky", "a", "b"):
            await touch(cache, entry(name))
        assert await cache.unload(entry("leaky"))
        assert cache.leaked == device.leaked == 10
        await touch(cache, entry("big"))  # a and b go together
        assert tiers(cache) == {"big": "device"}
        assert cache.leaked == device.leaked == 10 and cache.budget == 90

    asyncio.run(main())
