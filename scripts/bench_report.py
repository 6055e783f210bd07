"""The one writer of scripts/bench.py's results: Markdown tables (printed, and pasted into
docs/benchmarks.md) and the JSON file of --json, both from the same report dict."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_fidelity


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def steady_summary(requests: list[dict]) -> dict[str, Any]:
    """Median, min and max of the HTTP time and the median of each Server-Timing stage over
    the successful steady-state requests."""
    ok = [r for r in requests if r["status"] == 200]
    names = list(dict.fromkeys(name for r in ok for name in r["stages"]))
    return {"n": len(ok), "failed": len(requests) - len(ok),
            "http_ms": summarize([r["http_ms"] for r in ok]),
            "stages": {name: statistics.median([r["stages"].get(name, 0.0) for r in ok])
                       for name in names}}


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _mib(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def _stages(stages: dict[str, float]) -> str:
    return " · ".join(f"{name} {_ms(ms)}" for name, ms in stages.items()) or "–"


def _settings(run: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in run["settings"].items() if v not in (None, ""))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def request_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in runs:
        if "error" in run:
            rows.append([run["pipeline"], run.get("model", "–"), "error", run["error"][:160],
                         "–", "–"])
            continue
        first, steady = run["first"], run["steady"]
        http = steady["http_ms"] or {}
        failed = f" ({steady['failed']} failed)" if steady["failed"] else ""
        rows.append([
            run["pipeline"], run["model"], _one(first),
            f"{_ms(http.get('median'))} [{_ms(http.get('min'))}–{_ms(http.get('max'))}]"
            f" n={steady['n']}{failed}",
            _stages(steady["stages"]), _settings(run)])
        if run.get("cold"):
            rows.append(["", f"cold load: {run['cold_model']}", _one(run["cold"]), "–", "–",
                         "another model, loaded through the cache by this request"])
    return rows


def _one(record: dict) -> str:
    if record["status"] != 200:
        return f"HTTP {record['status']}"
    return f"{_ms(record['http_ms'])} ({_stages(record['stages'])})"


def memory_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in runs:
        if "error" in run:
            continue
        for i, m in enumerate(run["loads"]):
            rows.append([
                run["pipeline"] if i == 0 else "", m["id"], f"{m['load_seconds']:.2f}",
                _mib(m["estimated_mib"]), _mib(m["measured_mib"]),
                f"{run['startup_s']:.1f}" if i == 0 else "",
                _mib(run["peak_rss_mib"]) if i == 0 else "",
                (f"{_mib(run.get('peak_cuda_load_mib'))} / {_mib(run.get('peak_cuda_mib'))}"
                 if i == 0 and run.get("peak_cuda_mib") is not None else "")])
    return rows


def part_rows(runs: list[dict], key: str, width: int, row: Callable[[dict, dict], list[str]],
              lead: Callable[[dict], list[str]] = lambda run: [run["pipeline"]]
              ) -> list[list[str]]:
    """One row per run that has `key`: `lead(run)` then `row(run, run[key])`, or the part's
    error filling the rest of the `width` columns."""
    rows = []
    for run in runs:
        part = run.get(key)
        if not part:
            continue
        first = lead(run)
        if "error" in part:
            rows.append(first + [part["error"][:160]] + ["–"] * (width - len(first) - 1))
        else:
            rows.append(first + row(run, part))
    return rows


def naive_rows(runs: list[dict]) -> list[list[str]]:
    return part_rows(runs, "naive", 7, lambda run, naive: [
        _ms(summarize(naive["steady_ms"])["median"]) if naive["steady_ms"] else "–",
        f"{run['naive_ratio']:.2f}x" if run.get("naive_ratio") else "–",
        bench_fidelity.describe(run.get("fidelity")),
        f"{naive['load_s']:.2f}", _mib(naive.get("peak_cuda_mib"))],
        lead=lambda run: [run["pipeline"], _ms((run["steady"]["http_ms"] or {}).get("median"))])


def overhead_rows(runs: list[dict]) -> list[list[str]]:
    return part_rows(runs, "overhead", 8, lambda run, o: [
        str(o["rounds"]), f"{o['http_ms']:.1f}", f"{o['server_own_ms']:.2f}",
        f"{o['bare_ms']:.1f}" if "bare_ms" in o else "–",
        f"{o['over_bare_ms']:.2f}" if "over_bare_ms" in o else "–",
        f"{o['client_round_trip_ms']:.2f}", f"{run['startup_s']:.2f}"])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def ready_rows(runs: list[dict]) -> list[list[str]]:
    return part_rows(runs, "ready", 6, lambda run, r: [
        str(r["rounds"]), _spread(r["port_s"]), _spread(r["ready_s"]), _spread(r["floor_s"]),
        f"{r['own_s']:.2f}"])


def render(report: dict) -> str:
    """Markdown: the environment, then a table of requests, one of loads and memory, and one
    of the naive comparison when it ran."""
    env = report["environment"]
    out = [f"Date: {report['date']} · device: {env['device']} · mode: {env['mode']} · "
           f"torch {env['torch']} · diffusers {env.get('diffusers', '–')} · "
           f"transformers {env.get('transformers', '–')} · threads: {env['threads']}",
           f"Command: `{report['command']}`", ""]
    runs = report["runs"]
    out += ["Requests through the HTTP path (ms; first call, then the steady-state median "
            "[min–max] of the next calls; stages from Server-Timing, steady medians):", "",
            table(["pipeline", "model", "first call", "steady", "steady stages", "settings"],
                  request_rows(runs)), ""]
    out += ["Models loaded (warm-up and cold loads), start-up to /health IDLE, peak memory "
            "(RSS of the process so far; CUDA: after loading / during requests):", "",
            table(["pipeline", "model", "load s", "estimated MiB", "measured MiB", "start-up s",
                   "peak RSS MiB", "peak CUDA MiB"], memory_rows(runs)), ""]
    out += section(
        "The runner's own cost per request (ms, medians; scripts/bench_overhead.py): server "
        "own = the app's time outside the model's stages; bare = the same call on the "
        "runner's resident pipeline plus its safety check, interleaved; over bare = HTTP time "
        "minus bare (it includes the in-process client, whose round trip on a trivial route "
        "is given); start-up = to /health IDLE:",
        ["pipeline", "rounds", "HTTP", "server own", "bare + safety", "over bare",
         "client round trip", "start-up s"], overhead_rows(runs))
    out += section(
        "Start-up as a process (s, median [min–max]; scripts/bench_ready.py): `python -m "
        "runner` to its port's first answer and to /health IDLE; the library floor = a bare "
        "process importing the libraries and loading the same models with their plain calls "
        "(a lower bound); runner's own = IDLE - floor, medians:",
        ["pipeline", "rounds", "port answers", "/health IDLE", "library floor",
         "runner's own"], ready_rows(runs))
    out += section(
        "Naive baseline (the plain library path, float32 and default attention, same weights "
        "and settings, same process; ratio = naive / runner steady median; fidelity = the "
        "runner's last answer against the naive one for the same request, with its bound: "
        "PSNR for images and frames, word agreement for text, IoU for masks, see "
        "scripts/bench_fidelity.py):",
        ["pipeline", "runner ms", "naive ms", "ratio", "fidelity", "naive load s",
         "naive peak CUDA MiB"], naive_rows(runs))
    return "\n".join(out)


def section(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A captioned table, or nothing when no run has its rows."""
    return [caption, "", table(header, rows), ""] if rows else []
