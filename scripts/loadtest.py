"""Load test: many concurrent clients against a runner, mixing generate requests with /health
polls, as go-livepeer's orchestrator and its health checker do.

Each of `--clients` clients sends generate requests (64x64 text-to-image by default) until
`--requests` have been sent in all; one more task polls `/health` every `--health-interval`
seconds on its own connection. The report gives throughput, latency percentiles (p50/p90/p99),
counts per status code, the slowest /health answer and the server process's peak RSS.

The invariants it checks, and exits 1 when one fails:
- every generate request got an answer: a result (200) or busy with a Retry-After header (a 503,
  or, as go-livepeer's client reads it on the contract routes, a 500 whose message starts
  "insufficient capacity"); never a timeout, a dropped connection or any other status;
- every /health poll was answered (200, status OK or IDLE) while the load ran.

    python scripts/loadtest.py --spawn                        # start a tiny-mode runner
    python scripts/loadtest.py --spawn --clients 64 --requests 500 --max-queue 8
    python scripts/loadtest.py --url http://127.0.0.1:8000 --pid 1234 --json out.json

`--spawn` starts `python -m runner` on a free loopback port with TINY=1, PIPELINE (default
text-to-image) and MAX_QUEUE from the options, waits until /health leaves LOADING, and stops it
at the end.

`--soak` is the long run instead (scripts/soak.py): runners of every pipeline started the same
way (text-to-speech in its own, from `.venv-tts`), 20 minutes of every pipeline's sample
request mixed with bad inputs and clients that vanish mid-request, each runner's RSS sampled
every 10 s; it reports RSS growth after the warm-up, the statuses per route and /health's
latency, and fails on any 5xx other than busy.

    python scripts/loadtest.py --soak                          # 20 minutes
    python scripts/loadtest.py --soak --duration 180 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from _common import ROOT, spawned_runner

from runner.errors import BUSY  # how a busy 500's message starts

HEALTHY = ("OK", "IDLE")
DEFAULT_BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64,
                "num_inference_steps": 1, "safety_check": True}


# -- results ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int  # 0: no answer (timeout, connection error)
    seconds: float
    retry_after: str | None = None
    error: str = ""
    busy: bool = False  # a 503, or a 500 that says "insufficient capacity"


@dataclass
class Results:
    answers: list[Answer] = field(default_factory=list)
    health: list[Answer] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    peak_rss: int = 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"count": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": max(ms) if ms else math.nan,
            "mean": sum(ms) / len(ms) if ms else math.nan}


def is_busy(response: httpx.Response) -> bool:
    if response.status_code == 503:
        return True
    if response.status_code != 500:
        return False
    try:
        return str(response.json()["detail"]["msg"]).startswith(BUSY)
    except (ValueError, KeyError, TypeError):
        return False


def check(results: Results, expected: int) -> list[str]:
    """The invariants; each failure as a line."""
    failures = []
    if len(results.answers) != expected:
        failures.append(f"{len(results.answers)} of {expected} requests were sent/answered")
    for a in results.answers:
        if a.busy and not a.retry_after:
            failures.append(f"a {a.status} without Retry-After")
        elif a.status != 200 and not a.busy:
            failures.append(f"status {a.status or 'no answer'}: {a.error[:200]}")
    if not results.health:
        failures.append("/health was never polled")
    for h in results.health:
        if h.status != 200:
            failures.append(f"/health poll: {h.status or 'no answer'} {h.error[:200]}")
    return failures


def report(results: Results, args: argparse.Namespace, startup_s: float | None) -> dict:
    duration = results.finished - results.started
    statuses = Counter(a.status for a in results.answers)
    ok = [a.seconds for a in results.answers if a.status == 200]
    retry = [int(a.retry_after) for a in results.answers
             if a.retry_after and a.retry_after.isdigit()]
    failures = check(results, args.requests)
    return {
        "settings": {"url": args.url, "path": args.path, "clients": args.clients,
                     "requests": args.requests, "health_interval_s": args.health_interval,
                     "max_queue": args.max_queue if args.spawn else None,
                     "pipeline": args.pipeline if args.spawn else None},
        "startup_s": startup_s,
        "duration_s": duration,
        "throughput_rps": len(results.answers) / duration if duration > 0 else math.nan,
        "ok_rps": len(ok) / duration if duration > 0 else math.nan,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": latency_summary([a.seconds for a in results.answers]),
        "latency_ok_ms": latency_summary(ok),
        "retry_after_s": {"min": min(retry), "max": max(retry)} if retry else None,
        "health": {"polls": len(results.health),
                   "ok": sum(h.status == 200 for h in results.health),
                   **{k: v for k, v in latency_summary([h.seconds for h in results.health])
                      .items() if k in ("p50", "p99", "max")}},
        "server_peak_rss_mib": results.peak_rss / 2**20 if results.peak_rss else None,
        "failures": sorted(Counter(failures).items()),
        "passed": not failures,
    }


def print_report(summary: dict) -> None:
    s = summary["settings"]
    lat, ok, health = summary["latency_ms"], summary["latency_ok_ms"], summary["health"]
    print(f"target          {s['url']}{s['path']}  ({s['clients']} clients, "
          f"{s['requests']} requests)")
    if summary["startup_s"] is not None:
        print(f"startup         {summary['startup_s']:.1f} s to /health ready (IDLE)")
    print(f"duration        {summary['duration_s']:.2f} s")
    print(f"throughput      {summary['throughput_rps']:.1f} answers/s, "
          f"{summary['ok_rps']:.1f} results/s")
    print(f"statuses        {summary['statuses']}")
    print(f"latency (all)   p50 {lat['p50']:.0f} ms  p90 {lat['p90']:.0f} ms  "
          f"p99 {lat['p99']:.0f} ms  max {lat['max']:.0f} ms")
    print(f"latency (200)   p50 {ok['p50']:.0f} ms  p90 {ok['p90']:.0f} ms  "
          f"p99 {ok['p99']:.0f} ms  max {ok['max']:.0f} ms")
    if summary["retry_after_s"]:
        print(f"Retry-After     {summary['retry_after_s']['min']}-"
              f"{summary['retry_after_s']['max']} s")
    print(f"/health         {health['ok']}/{health['polls']} healthy, p50 {health['p50']:.1f} ms, "
          f"p99 {health['p99']:.1f} ms, max {health['max']:.1f} ms")
    if summary["server_peak_rss_mib"]:
        print(f"server peak RSS {summary['server_peak_rss_mib']:.0f} MiB")
    for failure, count in summary["failures"]:
        print(f"FAIL ({count}x)     {failure}")
    print("PASS" if summary["passed"] else "FAIL")


# -- the load --------------------------------------------------------------------------------------

async def run_load(args: argparse.Namespace, body: dict, results: Results) -> None:
    sent = 0
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.timeout, connect=10)

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal sent
        while sent < args.requests:
            number = sent
            sent += 1
            started = time.perf_counter()
            try:
                r = await http.post(args.path, json={**body, "seed": number}, headers=headers)
                await r.aread()
                busy = is_busy(r)
                answer = Answer(r.status_code, time.perf_counter() - started,
                                r.headers.get("retry-after"),
                                "" if r.status_code == 200 or busy else r.text, busy)
            except httpx.HTTPError as exc:
                answer = Answer(0, time.perf_counter() - started, error=repr(exc))
            results.answers.append(answer)

    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(args, results, stop), daemon=True)
    poller.start()
    results.started = time.perf_counter()
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(client(http, i) for i in range(args.clients)))
    results.finished = time.perf_counter()
    stop.set()
    await asyncio.to_thread(poller.join)


def poll_health(args: argparse.Namespace, results: Results, stop: threading.Event) -> None:
    """go-livepeer's health checker, in its own thread with a blocking client: a poll's time
    is the server's answer, not a wait for this process's busy event loop."""
    with httpx.Client(base_url=args.url, timeout=args.health_timeout) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                r = http.get("/health")
                healthy = r.status_code == 200 and r.json().get("status") in HEALTHY
                results.health.append(Answer(r.status_code if healthy else -r.status_code,
                                             time.perf_counter() - started,
                                             error="" if healthy else r.text))
            except (httpx.HTTPError, ValueError) as exc:
                results.health.append(Answer(0, time.perf_counter() - started,
                                             error=repr(exc)))
            stop.wait(args.health_interval)


@contextmanager
def rss_sampler(pid: int | None, results: Results, interval: float = 0.05):
    """Samples the server's RSS (with its children) in a thread; the peak goes to results."""
    stop = threading.Event()

    def sample() -> None:
        try:
            process = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                rss = process.memory_info().rss + sum(
                    c.memory_info().rss for c in process.children(recursive=True))
            except psutil.Error:
                return
            results.peak_rss = max(results.peak_rss, rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True) if pid else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join(timeout=5)


# -- a spawned runner ------------------------------------------------------------------------------

@contextmanager
def spawned(args: argparse.Namespace, pipeline: str, python: str = sys.executable):
    """A tiny-mode runner of `pipeline` (a name or a comma list) for the run, started by
    `python`: its url, pid and seconds to /health ready; its log is printed when the start or
    the run fails, and kept with --keep-log."""
    env = {**os.environ, "PIPELINE": pipeline, "TINY": "1", "DEVICE": "cpu",
           "MAX_QUEUE": str(args.max_queue), "AUTH_TOKEN": args.token or "",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if args.tiny_dir:
        env["TINY_DIR"] = str(args.tiny_dir)
    log = tempfile.NamedTemporaryFile("w+", prefix="runner-loadtest-", suffix=".log",
                                      delete=False)
    try:
        with spawned_runner(env, log, args.startup_timeout, ready=HEALTHY,
                            python=python) as runner:
            yield runner.url, runner.pid, runner.ready_s
    except BaseException:
        log.seek(0)
        print(log.read()[-4000:], file=sys.stderr)
        raise
    finally:
        log.close()
        if not args.keep_log:
            os.unlink(log.name)
        else:
            print(f"runner log: {log.name}", file=sys.stderr)


def listening_pid(url: str) -> int | None:
    """The pid of a local process listening on the URL's port, if it can be seen."""
    port = httpx.URL(url).port
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.Error, PermissionError):
        pass
    return None


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running runner, e.g. http://127.0.0.1:8000")
    target.add_argument("--spawn", action="store_true",
                        help="start `python -m runner` in tiny mode on a free port")
    target.add_argument("--soak", action="store_true",
                        help="start tiny-mode runners of every pipeline and soak them "
                             "(scripts/soak.py; the options below)")
    parser.add_argument("--clients", type=int, default=None,
                        help="concurrent clients (default 32; --soak: 3)")
    parser.add_argument("--requests", type=int, default=200, help="generate requests in all")
    parser.add_argument("--path", default="/text-to-image", help="generate route (JSON body)")
    parser.add_argument("--body", type=json.loads, default=None,
                        help="JSON body of each request (default: a 64x64 text-to-image); "
                             "`seed` is set per request")
    parser.add_argument("--health-interval", type=float, default=None,
                        help="seconds between /health polls (default 0.25; --soak: 1)")
    parser.add_argument("--health-timeout", type=float, default=5.0,
                        help="a /health poll slower than this is unanswered (go-livepeer: 5)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a generate request may take before it counts as unanswered")
    parser.add_argument("--token", default="", help="AUTH_TOKEN (sent as a bearer token)")
    parser.add_argument("--pid", type=int, default=None,
                        help="server pid for the RSS peak (--url; found by port when omitted)")
    parser.add_argument("--pipeline", default="text-to-image", help="PIPELINE for --spawn")
    parser.add_argument("--max-queue", type=int, default=4, help="MAX_QUEUE for --spawn")
    parser.add_argument("--tiny-dir", type=Path, default=None,
                        help="TINY_DIR for --spawn (reuse built tiny models)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--keep-log", action="store_true", help="keep the spawned runner's log")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--duration", type=float, default=1200.0,
                      help="seconds of load (default 20 minutes)")
    soak.add_argument("--warmup", type=float, default=None,
                      help="seconds before RSS growth is measured (default: a quarter of "
                           "--duration; later if a pipeline has not served by then)")
    soak.add_argument("--rss-interval", type=float, default=10.0,
                      help="seconds between RSS samples of each runner")
    soak.add_argument("--pipelines", default="all",
                      help="pipelines to soak: all, or a comma list (text-to-speech runs in "
                           "its own runner, from --tts-python)")
    soak.add_argument("--tts-python", type=Path, default=ROOT / ".venv-tts" / "bin" / "python",
                      help="the interpreter of text-to-speech's environment")
    soak.add_argument("--max-growth", type=float, default=None,
                      help="fail when a runner's RSS grows faster than this (MiB/h)")
    soak.add_argument("--seed", type=int, default=0, help="the order of the requests")
    args = parser.parse_args(argv)
    args.clients = args.clients or (3 if args.soak else 32)
    args.health_interval = args.health_interval or (1.0 if args.soak else 0.25)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    if args.duration <= 0 or args.rss_interval <= 0:
        parser.error("--duration and --rss-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.soak:
        import soak  # imports this module: not at its top

        return soak.run(args)
    body = args.body if args.body is not None else DEFAULT_BODY
    results = Results()
    startup = None
    if args.spawn:
        with spawned(args, args.pipeline) as (url, pid, startup):
            args.url = url
            with rss_sampler(pid, results):
                asyncio.run(run_load(args, body, results))
    else:
        args.url = args.url.rstrip("/")
        with rss_sampler(args.pid or listening_pid(args.url), results):
            asyncio.run(run_load(args, body, results))
    summary = report(results, args, startup)
    print_report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
