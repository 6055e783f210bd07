"""Random traces through runner.cache.ModelCache on the fake device (hypothesis): requests that
hold a model and reserve working memory, finishing in any order, pins, operator unloads,
foreign memory coming and going, out-of-memory errors. After every step:

- resident + running bytes stay within the budget (the device's true one: base minus foreign
  minus leaked), except for what the cache could not help: a load that measured more than its
  estimate, a leak found after the fact, and foreign growth while busy or pinned models hold
  the rest (then no idle model that could move is left on the device);
- a model a request holds stays on the device, the same object, until the request lets go;
- a pinned model, once loaded, is never out of memory unless an operator unloaded it;
- the host tier holds at most its budget; no request fails but with 503 or 422, and once
  every request is let go, none is left waiting (no deadlock, no demote/restore livelock);
- `evict_idle()` and `rebalance()` leave no idle movable model behind when they had to act;
- the cache's books agree with the fake device: the models and bytes on it, foreign bytes,
  and leaks (never more than the device really lost).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner.cache import ModelCache, Reservation
from runner.errors import FieldError, Unavailable
from tests.support.fake_device import (
    FakeDevice,
    FakeLoader,
    FakeModel,
    cheap_gc,
    entry,
    eventually,
)
from tests.support.helpers import HANG_S

BUDGET = 100


@dataclass(eq=False)
class Request:
    name: str
    estimate: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    model: FakeModel | None = None
    reservation: Reservation | None = None
    task: asyncio.Task | None = None
    outcome: str = "waiting"


models_st = st.lists(
    st.tuples(st.integers(5, 60),  # true size
              st.sampled_from([0.75, 1.0, 1.0, 1.25]),  # estimate / true size
              st.integers(0, 40)),  # true working-memory peak of a run
    min_size=2, max_size=5)

op_st = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 4), st.integers(0, 60)),
    st.tuples(st.just("finish"), st.integers(0, 15), st.just(0)),
    st.tuples(st.just("pin"), st.integers(0, 4), st.just(0)),
    st.tuples(st.just("unload"), st.integers(0, 4), st.just(0)),
    st.tuples(st.just("foreign"), st.integers(0, 60), st.just(0)),
    st.tuples(st.just("oom"), st.integers(0, 15), st.just(0)),
)

config_st = st.fixed_dictionaries({
    "host_budget": st.sampled_from([0, 30, 60, 150]),
    "special": st.lists(st.sampled_from(["external", "immovable", "leaky"]), max_size=2,
                        unique=True),
    "delay": st.sampled_from([0.0, 0.0, 0.001]),
})


def check_trace(models: list[tuple[int, float, int]], config: dict[str, Any],
                ops: list[tuple[str, int, int]]) -> None:
    names = [f"m{i}" for i in range(len(models))]
    true = {n: size for n, (size, _, _) in zip(names, models, strict=True)}
    estimates = {n: max(1, int(size * f)) for n, (size, f, _) in zip(names, models, strict=True)}
    special = dict(zip(config["special"], names[::-1], strict=False))  # distinct models
    leaky = {special["leaky"]: 3} if "leaky" in special else {}
    device = FakeDevice(total=BUDGET)
    fake = FakeLoader(estimates, true, device=device, host=config["host_budget"] > 0,
                      peaks={n: p for n, (_, _, p) in zip(names, models, strict=True)},
                      leaks=leaky,
                      immovable={special["immovable"]} if "immovable" in special else set(),
                      external={special["external"]} if "external" in special else set(),
                      delay=config["delay"])
    requests: list[Request] = []
    background: list[asyncio.Task] = []
    violations: list[str] = []
    pinned_loaded: set[str] = set()

    def held() -> list[Request]:
        return [r for r in requests if r.model is not None and not r.done.is_set()]

    def on_evict(model: FakeModel, tier: str) -> None:  # in the worker thread
        for r in held():
            if r.model is model:
                violations.append(f"{model.id} moved to {tier} while a request held it")

    fake.on_evict = on_evict

    async def request(cache: ModelCache, r: Request) -> None:
        e = entry(r.name)
        try:
            async with cache.use(e) as model:
                r.model = model
                async with cache.reserve(e, r.estimate) as reserved:
                    r.reservation = reserved
                    r.outcome = "running"
                    _, reserved.peak = device.measured(lambda m: None, model)
                    await r.done.wait()
            r.outcome = "ok"
        except (Unavailable, FieldError) as exc:
            r.outcome = type(exc).__name__
        finally:
            r.done.set()

    async def settle() -> None:
        for _ in range(4):
            await asyncio.sleep(0)
        await asyncio.sleep(0.002 + 2 * config["delay"])

    async def main() -> None:
        cache = fake.cache(budget=BUDGET, host_budget=config["host_budget"])
        allowance, leaked, measured = 0, 0, set()

        def idle_on_device() -> dict[str, tuple]:
            """Idle unpinned models on the device, with what would show a use since."""
            return {s.entry.id: (id(s), s.hits, s.loads, len(fake.moves))
                    for s in cache._slots.values()
                    if s.tier == "device" and s.idle and not s.pinned}

        def check(step: str, after_rebalance: bool) -> None:
            nonlocal allowance, leaked, measured
            assert not violations, violations
            assert not fake.errors, fake.errors
            # Budget, against the device's true foreign bytes.
            true_budget = max(0, BUDGET - device.foreign - cache.leaked)
            excess = cache.resident_bytes + cache.running_bytes - true_budget
            # What the cache could not help: leaks found and loads measured over their
            # estimate since the last check.
            now_measured = {k for k, v in cache._learned.items() if v.weights is not None}
            grown = max(0, cache.leaked - leaked) + sum(
                max(0, true[k.split("/")[-1]] - estimates[k.split("/")[-1]])
                for k in now_measured - measured)
            if after_rebalance:
                allowance = max(0, excess)
            assert excess <= allowance + grown, (
                f"{step}: resident {cache.resident_bytes} + running {cache.running_bytes} "
                f"over budget {true_budget} by {excess} (allowed {allowance} + {grown})")
            allowance, leaked, measured = max(0, excess), cache.leaked, now_measured
            # Held models stay put.
            for r in held():
                slot = cache._slots.get(ModelCache.key(entry(r.name)))
                assert slot is not None and slot.tier == "device" and slot.model is r.model, (
                    f"{step}: {r.name} moved while held")
                assert r.model.tier == "device"
            # Pinned models stay in memory.
            for s in cache._slots.values():
                if s.pinned and s.tier != "none":
                    pinned_loaded.add(s.entry.id)
            for model_id in pinned_loaded:
                slot = cache._slots.get(ModelCache.key(entry(model_id.removeprefix("test/"))))
                assert slot is not None and slot.pinned and slot.tier in ("device", "host"), (
                    f"{step}: pinned {model_id} left memory")
            # The host tier.
            host = sum(s.bytes for s in cache._slots.values() if s.tier == "host")
            assert host <= cache.host_budget, f"{step}: host tier {host} of {cache.host_budget}"
            assert sum(m.nbytes for m in device.models if m.tier == "host") <= cache.host_budget
            # Leaks are real ones.
            assert cache.leaked <= device.leaked, f"{step}: leaked {cache.leaked} counted"
            for task in [*background, *(r.task for r in requests)]:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()

        for i, (op, a, b) in enumerate(ops):
            step = f"step {i} {op}({a}, {b})"
            rebalanced = False
            if op == "start":
                r = Request(names[a % len(names)], b)
                r.task = asyncio.ensure_future(request(cache, r))
                requests.append(r)
            elif op == "finish":
                live = [r for r in requests if not r.done.is_set()]
                if live:
                    live[a % len(live)].done.set()
            elif op == "pin":
                async def pin(name: str) -> None:
                    try:
                        await cache.pin(entry(name))
                    except (Unavailable, FieldError):
                        pass
                background.append(asyncio.ensure_future(pin(names[a % len(names)])))
            elif op == "unload":
                e = entry(names[a % len(names)])
                if await cache.unload(e):
                    pinned_loaded.discard(e.id)
                    slot = cache._slots.get(ModelCache.key(e))
                    assert slot is None or slot.tier == "none" or slot.users, step
            elif op == "foreign":
                device.foreign = a
                before = idle_on_device()
                known = sum(v.weights is not None for v in cache._learned.values())
                await cache.rebalance()
                rebalanced = True
                # Over budget with only busy or pinned models left, or every idle one moves.
                left = [k for k, v in idle_on_device().items() if before.get(k) == v]
                if cache.free < 0 and known == sum(
                        v.weights is not None for v in cache._learned.values()):
                    assert not left, f"{step}: over budget with idle {left} on the device"
            elif op == "oom":
                running = [r for r in requests if r.outcome == "running"
                           and not r.done.is_set() and r.reservation.bucket]
                if running:
                    r = running[a % len(running)]
                    cache.oom(entry(r.name), r.reservation)
                    assert (cache.working_bytes(entry(r.name), r.estimate)[0]
                            >= int(r.reservation.nbytes * 1.5)), step
                before = idle_on_device()
                await cache.evict_idle()
                left = [k for k, v in idle_on_device().items() if before.get(k) == v]
                assert not left, f"{step}: evict_idle left {left}"
            await settle()
            check(step, rebalanced)

        # Everything finishes: nothing is left waiting or holding a model.
        device.foreign = 0
        await cache.rebalance()
        for r in requests:
            r.done.set()
        pending = [*background, *(r.task for r in requests)]
        done, not_done = (await asyncio.wait(pending, timeout=HANG_S) if pending
                          else (set(), set()))
        assert not not_done, f"{len(not_done)} requests never finished"
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        await settle()
        check("end", after_rebalance=False)
        # a pinned model's restore may still be under way
        await eventually(lambda: all(s.moving is None for s in cache._slots.values()))
        assert all(d["in_flight"] == 0 for d in cache.describe())
        assert cache.running_bytes == 0 and all(s.idle for s in cache._slots.values())
        # The cache's books and the device agree once nothing moves.
        on_device = {id(s.model) for s in cache._slots.values() if s.tier == "device"}
        assert on_device == {id(m) for m in device.on_device()}
        assert cache.resident_bytes == sum(m.nbytes for m in device.on_device())
        assert cache.leaked <= device.leaked  # overlapping moves are not checked
        cache.refresh()
        assert cache.foreign == device.foreign == 0
        if any(r.outcome == "ok" for r in requests):
            assert fake.loads

    with cheap_gc():
        asyncio.run(main())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models=models_st, config=config_st, ops=st.lists(op_st, min_size=1, max_size=30))
# A pinned model demoted for a waiting reservation came straight back (restored while the
# request still held its own model) and was demoted again, forever.
@example(models=[(50, 1.0, 0), (20, 1.0, 0), (20, 1.0, 0)],
         config={"host_budget": 150, "special": [], "delay": 0.0},
         ops=[("pin", 0, 0), ("start", 1, 0), ("finish", 0, 0), ("start", 2, 70),
              ("finish", 0, 0)])
# Foreign growth that idle models alone could not offset left them all on the device.
@example(models=[(30, 1.0, 0), (20, 1.0, 0), (20, 1.0, 0)],
         config={"host_budget": 0, "special": [], "delay": 0.0},
         ops=[("start", 1, 0), ("finish", 0, 0), ("start", 0, 10), ("foreign", 90, 0)])
# Dropping a daemon's model (external) was counted as a leak of all of its bytes.
@example(models=[(30, 1.0, 0), (20, 1.0, 0)],
         config={"host_budget": 60, "special": ["external"], "delay": 0.0},
         ops=[("start", 1, 0), ("finish", 0, 0), ("oom", 0, 0)])
# Two demotions in one plan into room for one: both failed and both were dropped.
@example(models=[(10, 1.0, 0), (10, 1.0, 0), (10, 1.0, 0)],
         config={"host_budget": 30, "special": [], "delay": 0.0},
         ops=[("start", 0, 0), ("start", 1, 0), ("start", 2, 0), ("finish", 0, 0),
              ("finish", 0, 0), ("finish", 0, 0), ("oom", 0, 0), ("unload", 0, 0)])
# Two requests each held the model the other's reservation needed gone, and waited forever.
@example(models=[(43, 0.75, 0), (5, 0.75, 0), (35, 0.75, 0)],
         config={"host_budget": 0, "special": [], "delay": 0.0},
         ops=[("start", 0, 1), ("start", 0, 57), ("start", 2, 23)])
def test_random_traces_keep_the_cache_invariants(models, config, ops):
    check_trace(models, config, ops)


def test_trace_with_every_feature_runs_long():
    """One long fixed trace, so every run exercises leaks, daemons, host drops and pins. (That
    it ends at all is checked: every request must finish within HANG_S once let go.)"""
    ops = [("pin", 0, 0), ("start", 1, 20), ("start", 2, 30), ("start", 3, 10),
           ("foreign", 40, 0), ("finish", 0, 0), ("oom", 0, 0), ("start", 4, 50),
           ("finish", 1, 0), ("unload", 3, 0), ("foreign", 0, 0), ("start", 0, 40),
           ("start", 3, 15), ("pin", 2, 0), ("finish", 0, 0), ("finish", 0, 0),
           ("foreign", 55, 0), ("start", 1, 60), ("unload", 0, 0), ("finish", 2, 0),
           ("oom", 1, 0), ("foreign", 10, 0), ("start", 2, 25), ("finish", 0, 0)]
    check_trace([(40, 1.0, 20), (25, 1.25, 10), (30, 0.75, 35), (15, 1.0, 5), (35, 1.0, 15)],
                {"host_budget": 60, "special": ["external", "leaky"], "delay": 0.001}, ops)
