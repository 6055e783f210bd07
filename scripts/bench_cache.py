"""The cache's own costs, through the service's real loader: a hit, a load from disk, a
demotion to the host tier and the promotion back, and a drop; each timed `rounds` times
(scripts/bench.py --cache)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import bench_report

MODEL = "stabilityai/sd-turbo"  # not the pipeline's default, so not pinned


def _timed(portal: Any, fn: Any, *args: Any) -> tuple[float, Any]:
    """Milliseconds of one call on the app's event loop (including the hop to it)."""
    started = time.perf_counter()
    result = portal.call(fn, *args)
    return (time.perf_counter() - started) * 1000, result


async def _hit(cache: Any, entry: Any) -> None:
    async with cache.use(entry):
        pass


def measure(pipeline: str, settings: dict, rounds: int = 3, model: str = MODEL) -> dict:
    """Milliseconds per operation (median of `rounds`) and the model's bytes."""
    from fastapi.testclient import TestClient

    from runner.app import create_app
    from runner.settings import Settings

    # A host tier even on CPU, where it frees nothing, so its bookkeeping is timed too.
    settings = {"host_budget": 64 << 30, "health_probe_seconds": 0, **settings}
    app = create_app(Settings(pipeline=pipeline, **settings))
    service = app.state.service
    cache, entry = service.cache, service.registry.resolve(pipeline, model)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("hit", "disk_load", "demote", "host_load", "drop")}
    with TestClient(app) as client:
        while client.get("/health").json()["status"] == "LOADING":
            time.sleep(0.02)
        portal = client.portal
        for _ in range(rounds):
            times["disk_load"].append(_timed(portal, cache.load, entry)[0])
            times["hit"].append(min(_timed(portal, _hit, cache, entry)[0] for _ in range(20)))
            demote_ms, demoted = _timed(portal, cache.demote, entry)
            if demoted:
                times["demote"].append(demote_ms)
                times["host_load"].append(_timed(portal, cache.load, entry)[0])
            times["drop"].append(_timed(portal, cache.unload, entry)[0])
        size = cache._learned[cache.key(entry)].weights
    return {"model": model, "mode": service.mode, "rounds": rounds, "bytes": size,
            "ms": {k: statistics.median(v) if v else None for k, v in times.items()}}


def render(result: dict) -> str:
    ms = result["ms"]
    rows = [[name, bench_report._ms(ms[key])] for name, key in (
        ("hit (model resident)", "hit"), ("load from disk", "disk_load"),
        ("demote to host tier (eviction)", "demote"), ("load from host tier", "host_load"),
        ("drop from memory (eviction)", "drop"))]
    title = (f"cache costs: {result['model']}, {result['mode']} mode, "
             f"{(result['bytes'] or 0) / 2**20:.1f} MiB, median of {result['rounds']}")
    return f"{title}\n\n" + bench_report.table(["operation", "ms"], rows)
