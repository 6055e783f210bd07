"""Shared by the scripts: repo root on sys.path, the registry and pipeline modules, and a
`python -m runner` spawned and watched until it serves."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runner.registry import ModelEntry, Registry  # noqa: E402
from runner.spec import discover  # noqa: E402


def selected_entries(registry: Registry, pipeline: str, model: str | None,
                     with_safety: bool = True) -> list[ModelEntry]:
    """The entries named by --pipeline (a name, a comma list, or all) and --model."""
    names = registry.pipelines if pipeline == "all" else pipeline.split(",")
    unknown = [n for n in names if n not in registry.pipelines]
    if unknown:
        raise SystemExit(f"unknown pipeline(s) {unknown}; known: {registry.pipelines}")
    entries = [e for n in names for e in registry.entries(n) if model in (None, e.id)]
    if model and not entries:
        raise SystemExit(f"{model} is not listed in models.yaml for {names}")
    return entries + ([registry.safety_checker] if with_safety else [])


# -- a spawned runner ------------------------------------------------------------------------

@dataclass
class Started:
    """A spawned runner that serves: where, and how long it took (s from the spawn)."""

    url: str
    pid: int
    port_s: float  # the port's first answer (go-livepeer's first health check passes here)
    ready_s: float  # /health said one of the statuses waited for
    status: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(url: str) -> str | None:
    """/health's status, or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return json.load(answer).get("status")
    except OSError:
        return None


@contextmanager
def spawned_runner(env: dict[str, str], log: IO[str], timeout: float,
                   ready: tuple[str, ...] = ("IDLE",), poll: float = 0.1,
                   python: str = sys.executable) -> Iterator[Started]:
    """`python -m runner` (this interpreter, or `python`: another virtualenv's) on a free
    loopback port with `env`, its output to `log`, yielded
    once /health says one of `ready`; stopped with SIGTERM (killed after 30 s) on leaving.
    RuntimeError if it exits or says ERROR first, TimeoutError after `timeout` s. /health is
    polled every `poll` s: each answer takes the GIL from the thread that is loading, so
    polling much faster slows the start it watches."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "runner"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**env, "HOST": "127.0.0.1", "PORT": str(port)})
    try:
        yield _watch(proc, url, started, timeout, ready, poll)
    finally:
        _stop(proc)


def _watch(proc: subprocess.Popen, url: str, started: float, timeout: float,
           ready: tuple[str, ...], poll: float) -> Started:
    answered = None
    while (now := time.perf_counter() - started) < timeout:
        status = health_status(url)
        if status is not None and answered is None:
            answered = now
        if status in ready:
            return Started(url, proc.pid, answered or now, now, status)
        if status == "ERROR":
            raise RuntimeError("the runner reports /health ERROR")
        if proc.poll() is not None:
            raise RuntimeError(f"the runner exited with {proc.returncode} before it was ready")
        time.sleep(poll)
    raise TimeoutError(f"the runner was not ready within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


__all__ = ["ROOT", "discover", "free_port", "health_status", "Registry", "selected_entries",
           "spawned_runner", "Started"]
