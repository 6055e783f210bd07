"""The soak (`scripts/loadtest.py --soak`): every pipeline served for a long while, to find what
grows.

Two tiny-mode runners are started: one with every pipeline but text-to-speech (this
interpreter, `.venv`), one with text-to-speech (`--tts-python`, `.venv-tts`: parler-tts pins
an older transformers). For `--duration` seconds `--clients` clients send scripts/soak_mix.py's
rounds (every pipeline's sample request, bad inputs, clients that vanish mid-request; past
`--duration` until the first round is done), while
each runner's RSS (with its children) is sampled every `--rss-interval` s and its /health polled
every `--health-interval` s on a connection of its own.

RSS growth is measured from the end of the warm-up, the first sample once `--warmup` seconds
have passed (default: a quarter of the run) and every pipeline has served its sample request,
to the last sample, after the load has stopped and /health is IDLE again. The run fails (exit 1)
on any 5xx other than busy, a busy answer without Retry-After, a sample not served (neither a
result nor busy), a bad input not answered with a 4xx, a request never answered, a /health poll
missed, a runner that dies or is not IDLE once the load stops, or growth above
`--max-growth` MiB/h when that is given.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import math
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from _common import discover, health_status
from loadtest import Results, is_busy, latency_summary, poll_health, spawned
from soak_mix import Item, Kind, Leave, deck, items, large_uploads

TTS = "text-to-speech"
IDLE_WAIT_S = 60.0  # after the load, how long a runner may take to say IDLE again
MIB = 2**20


# -- what happened ---------------------------------------------------------------------------

@dataclass
class Outcome:
    item: Item
    status: int  # 0: no answer (timeout, connection error); for a vanishing client, what it saw
    seconds: float
    at: float  # when it ended, seconds from the start of the load
    retry_after: str | None = None
    busy: bool = False
    error: str = ""
    round: int = 0  # which round of the deck it was dealt in


@dataclass
class Served:
    """One runner process of the soak."""

    name: str
    pipelines: list[str]
    url: str
    pid: int
    startup_s: float
    rss: list[tuple[float, int]] = field(default_factory=list)  # (s from the load's start, B)
    health: Results = field(default_factory=Results)  # its polls, in .health
    died: bool = False
    idle_after_s: float | None = None  # after the load, until /health said IDLE


@dataclass
class Trace:
    runners: list[Served]
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    round_size: int = 0  # requests in a round of the mix


# -- the runners -----------------------------------------------------------------------------

def groups(pipelines: list[str], tts_python: Path) -> list[tuple[str, list[str], str]]:
    """(name, pipelines, interpreter) per runner process."""
    main = [p for p in pipelines if p != TTS]
    out = [("main", main, sys.executable)] if main else []
    if TTS in pipelines:
        if not tts_python.exists():
            raise SystemExit(f"{tts_python} is missing: `make install-tts` builds it, or leave "
                             f"{TTS} out with --pipelines")
        out.append(("tts", [TTS], str(tts_python)))
    return out


def rss_of(process: psutil.Process) -> int:
    return process.memory_info().rss + sum(c.memory_info().rss
                                           for c in process.children(recursive=True))


def sample_rss(runner: Served, start: float, interval: float, stop: threading.Event) -> None:
    """The runner's RSS every `interval` s until `stop`, and once more then."""
    try:
        process = psutil.Process(runner.pid)
        while True:
            runner.rss.append((time.perf_counter() - start, rss_of(process)))
            if stop.wait(interval):
                runner.rss.append((time.perf_counter() - start, rss_of(process)))
                return
    except psutil.Error:
        runner.died = True


def wait_idle(runner: Served, limit: float = IDLE_WAIT_S) -> None:
    began = time.perf_counter()
    while time.perf_counter() - began < limit:
        if health_status(runner.url) == "IDLE":
            runner.idle_after_s = time.perf_counter() - began
            return
        time.sleep(0.5)


# -- the load --------------------------------------------------------------------------------

async def send(http: httpx.AsyncClient, item: Item, url: str, headers: dict[str, str],
               start: float, rng: random.Random) -> Outcome:
    began = time.perf_counter()
    if item.leave is not None:
        status, error = await vanish(item, url, headers, rng, http.timeout.read or 300.0)
        return Outcome(item, status, time.perf_counter() - began, time.perf_counter() - start,
                       error=error)
    try:
        response = await http.send(item.body.request(url, headers))
        busy = is_busy(response)
        return Outcome(item, response.status_code, time.perf_counter() - began,
                       time.perf_counter() - start, response.headers.get("retry-after"), busy,
                       stream_error(item, response) if response.status_code == 200 else
                       "" if busy else response.text[:300])
    except httpx.HTTPError as exc:
        return Outcome(item, 0, time.perf_counter() - began, time.perf_counter() - start,
                       error=repr(exc))


def stream_error(item: Item, response: httpx.Response) -> str:
    """What is wrong with a streamed answer: it must end with [DONE], with no error chunk."""
    if not item.stream:
        return ""
    text = response.text
    if not text.rstrip().endswith("data: [DONE]"):
        return f"the stream did not end with [DONE]: ...{text[-200:]!r}"
    if '"finish_reason":"error"' in text.replace(" ", "") or 'data: {"error"' in text:
        return f"the stream carried an error: {text[-300:]!r}"
    return ""


async def vanish(item: Item, url: str, headers: dict[str, str], rng: random.Random,
                 timeout: float) -> tuple[int, str]:
    """Do what the item's client does before it leaves; the status it saw, if any, and an
    error when it could not even do that (a refused connection)."""
    address = httpx.URL(url)
    try:
        reader, writer = await asyncio.open_connection(address.host, address.port)
    except OSError as exc:
        return 0, repr(exc)
    status = -1  # left before any answer
    try:
        if item.leave is not Leave.SILENT:
            head, body = item.body.raw(url, headers)
            if item.leave is Leave.CUT_UPLOAD:
                writer.write(head + body[:len(body) // 2])
            else:
                writer.write(head + body)
            await writer.drain()
            if item.leave is Leave.MID_STREAM:
                status = await first_chunk(reader, timeout)
            else:
                await asyncio.sleep(rng.uniform(0.0, 0.5))
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return status, f"{item.leave}: {exc!r}"
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    return status, ""


async def first_chunk(reader: asyncio.StreamReader, timeout: float) -> int:
    """Read up to the end of a streamed answer's first event (or a non-stream answer's head):
    its status."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split()[1])
    if status == 200:
        await asyncio.wait_for(reader.readuntil(b"\n\n"), timeout)
    return status


async def run_load(trace: Trace, args: argparse.Namespace, urls: dict[str, str]) -> None:
    """`args.clients` clients deal from one deck until `args.duration` s have passed and the
    first round is dealt (every request of the mix, once at least); the requests in flight
    then finish."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    trace.round_size = len(items(sorted(urls)))
    cards = deck(sorted(urls), args.seed)
    rng = random.Random(args.seed)
    deadline = trace.started + args.duration

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            number, item = next(cards)
            if number > 0 and time.perf_counter() >= deadline:
                return
            outcome = await send(http, item, urls[item.pipeline], headers, trace.started, rng)
            outcome.round = number
            trace.outcomes.append(outcome)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10),
                                 limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))


def soak(args: argparse.Namespace, pipelines: list[str]) -> Trace:
    """Start the runners, observe them under the load, stop them."""
    large_uploads()  # made before any clock starts
    with ExitStack() as stack:
        runners = []
        for name, served, python in groups(pipelines, args.tts_python):
            url, pid, startup = stack.enter_context(spawned(args, ",".join(served), python))
            runners.append(Served(name, served, url, pid, startup))
        return observe(runners, args)


def observe(runners: list[Served], args: argparse.Namespace) -> Trace:
    """The load against the runners, with each one's RSS sampler and /health poller beside
    it; then each one's wait for IDLE."""
    trace = Trace(runners)
    urls = {p: r.url for r in runners for p in r.pipelines}
    stop, threads = threading.Event(), []
    trace.started = time.perf_counter()
    for runner in runners:
        polling = copy.copy(args)
        polling.url = runner.url
        threads += [threading.Thread(target=poll_health, daemon=True,
                                     args=(polling, runner.health, stop)),
                    threading.Thread(target=sample_rss, daemon=True,
                                     args=(runner, trace.started, args.rss_interval, stop))]
    for thread in threads:
        thread.start()
    try:
        asyncio.run(run_load(trace, args, urls))
        trace.finished = time.perf_counter()
        for runner in runners:
            wait_idle(runner)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=args.health_timeout + 5)
    return trace


# -- the report ------------------------------------------------------------------------------

def served_all_at(trace: Trace) -> dict[str, float | None]:
    """Per pipeline, when a sample request was first answered with a result."""
    first: dict[str, float | None] = {p: None for r in trace.runners for p in r.pipelines}
    for o in trace.outcomes:
        if o.item.kind is Kind.SAMPLE and o.status == 200 and first.get(o.item.pipeline) is None:
            first[o.item.pipeline] = o.at
    return first


def first_round_at(trace: Trace) -> float | None:
    """When the last request of the first round was done (every item of the mix once);
    None if it never was."""
    first = [o.at for o in trace.outcomes if o.round == 0]
    return max(first) if first and len(first) == trace.round_size else None


def warm_at(trace: Trace, warmup: float) -> float:
    """The end of the warm-up: `warmup` s, or later once every pipeline has served a
    result and the first round is done; infinite when either never happened."""
    served = served_all_at(trace).values()
    first_round = first_round_at(trace)
    if None in served or first_round is None:
        return math.inf
    return max(warmup, first_round, *(at for at in served if at is not None))


def slope_per_hour(points: list[tuple[float, int]]) -> float | None:
    """Least-squares MiB per hour through the points; None for fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return sum((t - mean_t) * (r - mean_r) for t, r in points) / spread * 3600 / MIB


def rss_summary(rss: list[tuple[float, int]], warm_at: float) -> dict:
    after = [(t, r) for t, r in rss if t >= warm_at]
    summary: dict = {"samples": [[round(t, 1), round(r / MIB, 1)] for t, r in rss],
                     "start_mib": rss[0][1] / MIB if rss else None,
                     "peak_mib": max(r for _, r in rss) / MIB if rss else None}
    if len(after) < 2:
        return {**summary, "warm_at_s": None, "warm_mib": None, "end_mib": None,
                "growth_mib": None, "growth_mib_per_h": None, "slope_mib_per_h": None}
    (t0, r0), (t1, r1) = after[0], after[-1]
    growth = (r1 - r0) / MIB
    return {**summary, "warm_at_s": t0, "warm_mib": r0 / MIB, "end_mib": r1 / MIB,
            "growth_mib": growth, "growth_mib_per_h": growth / (t1 - t0) * 3600 if t1 > t0
            else None, "slope_mib_per_h": slope_per_hour(after)}


def status_key(o: Outcome) -> str:
    if o.item.leave is not None:
        return "left" if o.status <= 0 else f"left after {o.status}"
    if o.status == 0:
        return "no answer"
    return f"{o.status} busy" if o.busy else str(o.status)


def by_route(outcomes: list[Outcome]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for o in outcomes:
        counts[o.item.route][o.item.kind.value][status_key(o)] += 1
    return {route: {kind: dict(sorted(c.items())) for kind, c in sorted(kinds.items())}
            for route, kinds in sorted(counts.items())}


def by_item(outcomes: list[Outcome]) -> dict[str, dict]:
    """Per item, its answers and how long they took (ms): where the time went."""
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        grouped[o.item.label].append(o)
    return {label: {"statuses": dict(Counter(status_key(o) for o in group)),
                    **{k: v for k, v in latency_summary([o.seconds for o in group]).items()
                       if k in ("count", "p50", "max")}}
            for label, group in sorted(grouped.items())}


def failure(o: Outcome) -> str | None:
    """What is wrong with one outcome, if anything."""
    label = o.item.label
    if o.item.leave is not None:
        return f"{label}: {o.error[:200]}" if o.error and o.status == 0 else None
    if o.status == 0:
        return f"{label}: no answer {o.error[:200]}"
    if o.busy:
        return None if o.retry_after else f"{label}: a busy {o.status} without Retry-After"
    if o.status >= 500:
        return f"{label}: {o.status} {o.error[:200]}"
    if o.item.kind is Kind.SAMPLE and (o.status != 200 or o.error):
        return f"{label}: {o.status} {o.error[:200]}"
    if o.item.kind is Kind.BAD and not 400 <= o.status < 500:
        return f"{label}: a bad input answered {o.status}"
    return None


def check(trace: Trace, rss: dict[str, dict], max_growth: float | None) -> list[str]:
    failures = [f for o in trace.outcomes if (f := failure(o))]
    failures += [f"{p} never served its sample request"
                 for p, at in served_all_at(trace).items() if at is None]
    if first_round_at(trace) is None:
        failures.append("the first round of the mix was not done")
    for runner in trace.runners:
        if runner.died:
            failures.append(f"the {runner.name} runner died")
        if not runner.health.health:
            failures.append(f"the {runner.name} runner's /health was never polled")
        failures += [f"{runner.name} /health poll: {h.status or 'no answer'} {h.error[:200]}"
                     for h in runner.health.health if h.status != 200]
        if runner.idle_after_s is None:
            failures.append(f"the {runner.name} runner was not IDLE {IDLE_WAIT_S:.0f} s after "
                            f"the load")
        growth = rss[runner.name]["growth_mib_per_h"]
        if max_growth is not None and growth is not None and growth > max_growth:
            failures.append(f"the {runner.name} runner's RSS grew {growth:.0f} MiB/h "
                            f"(limit {max_growth:.0f})")
    return failures


def report(trace: Trace, args: argparse.Namespace) -> dict:
    served = served_all_at(trace)
    rss = {r.name: rss_summary(r.rss, warm_at(trace, args.warmup)) for r in trace.runners}
    failures = check(trace, rss, args.max_growth)
    duration = trace.finished - trace.started
    return {
        "settings": {"duration_s": args.duration, "clients": args.clients,
                     "warmup_s": args.warmup, "rss_interval_s": args.rss_interval,
                     "health_interval_s": args.health_interval, "seed": args.seed,
                     "date": datetime.date.today().isoformat()},
        "load_s": duration,
        "requests": len(trace.outcomes),
        "requests_by_kind": dict(Counter(o.item.kind.value for o in trace.outcomes)),
        "every_pipeline_served_at_s": None if None in served.values() else
        max(at for at in served.values() if at is not None),
        "first_round_done_at_s": first_round_at(trace),
        "rounds": 1 + max((o.round for o in trace.outcomes), default=-1),
        "runners": {r.name: {"pipelines": r.pipelines, "pid": r.pid, "startup_s": r.startup_s,
                             "idle_after_s": r.idle_after_s,
                             "requests": sum(o.item.pipeline in r.pipelines
                                             for o in trace.outcomes),
                             "rss": rss[r.name],
                             "health": {"polls": len(r.health.health),
                                        "ok": sum(h.status == 200 for h in r.health.health),
                                        **{k: v for k, v in latency_summary(
                                            [h.seconds for h in r.health.health]).items()
                                           if k in ("p50", "p99", "max")}}}
                    for r in trace.runners},
        "by_route": by_route(trace.outcomes),
        "by_item": by_item(trace.outcomes),
        "other_5xx": sum(o.status >= 500 and not o.busy for o in trace.outcomes
                         if o.item.leave is None),
        "failures": sorted(Counter(failures).items()),
        "passed": not failures,
    }


def cell(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "–"


def mib(value: float | None, sign: bool = False) -> str:
    return "–" if value is None else f"{value:+.1f}" if sign else f"{value:.0f}"


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [f"Soak, {s['date']}: {summary['load_s']:.0f} s of load, {s['clients']} clients, "
             f"{summary['requests']} requests in {summary['rounds']} rounds of the mix "
             f"({cell(summary['requests_by_kind'])}); RSS every {s['rss_interval_s']:g} s, "
             f"/health every {s['health_interval_s']:g} s.", "",
             "| runner | pipelines | requests | start-up s | RSS after warm-up MiB (at s) | "
             "RSS at end MiB | growth MiB | MiB/h (fit) | /health polls | p50 / p99 / max ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["runners"].items():
        rss, h = r["rss"], r["health"]
        warm = "–" if rss["warm_mib"] is None else f"{rss['warm_mib']:.0f} ({rss['warm_at_s']:.0f})"
        lines.append(f"| {name} | {len(r['pipelines'])} | {r['requests']} | {r['startup_s']:.1f} "
                     f"| {warm} | {mib(rss['end_mib'])} | {mib(rss['growth_mib'], True)} | "
                     f"{mib(rss['growth_mib_per_h'], True)} ({mib(rss['slope_mib_per_h'], True)}) "
                     f"| {h['ok']}/{h['polls']} | {h['p50']:.1f} / {h['p99']:.1f} / "
                     f"{h['max']:.0f} |")
    lines += ["", "| route | sample requests | bad inputs | vanished clients |",
              "|---|---|---|---|"]
    for route, kinds in summary["by_route"].items():
        lines.append(f"| {route} | {cell(kinds.get('sample', {}))} | "
                     f"{cell(kinds.get('bad', {}))} | {cell(kinds.get('vanish', {}))} |")
    lines += ["", f"5xx other than busy: {summary['other_5xx']}."]
    return "\n".join(lines)


def print_report(summary: dict) -> None:
    print(markdown(summary))
    print()
    for failure_, count in summary["failures"]:
        print(f"FAIL ({count}x)     {failure_}")
    print("PASS" if summary["passed"] else "FAIL")


def selected(pipelines: str) -> list[str]:
    """--pipelines: `all` (every pipeline of the repository, text-to-speech included) or a
    comma list."""
    known = sorted(discover(installed_only=False))
    names = known if pipelines == "all" else [p.strip() for p in pipelines.split(",")
                                               if p.strip()]
    if unknown := [p for p in names if p not in known]:
        raise SystemExit(f"unknown pipeline(s) {unknown}; known: {known}")
    return names


def run(args: argparse.Namespace) -> int:
    pipelines = selected(args.pipelines)
    if args.warmup is None:
        args.warmup = args.duration / 4
    trace = soak(args, pipelines)
    summary = report(trace, args)
    print_report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary["passed"] else 1
