"""scripts/loadtest.py: a small run against a spawned tiny-mode runner keeps the invariants
(every request answered with 200, or 503 with Retry-After; every /health poll answered), and
the script fails a server that breaks them. No durations are asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from runner.settings import REPO_ROOT
from tests.conftest import LiveServer
from tests.support.helpers import HANG_S

SCRIPT = REPO_ROOT / "scripts" / "loadtest.py"


def loadtest_module():
    if "loadtest" not in sys.modules:  # dataclasses look their module up while defined
        sys.path.insert(0, str(SCRIPT.parent))  # as when it runs: its _common beside it
        spec = importlib.util.spec_from_file_location("loadtest", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["loadtest"] = module
        spec.loader.exec_module(module)
    return sys.modules["loadtest"]


def test_spawned_runner_under_load_answers_every_request(hardening_dir, tmp_path):
    out = tmp_path / "loadtest.json"
    # Every /health poll must be answered, however slowly this machine answers it (the 5 s
    # go-livepeer allows is the script's default, for a runner on its own machine).
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--spawn", "--clients", "24", "--requests", "48",
         "--max-queue", "2", "--health-interval", "0.1", "--health-timeout", str(HANG_S),
         "--tiny-dir", str(hardening_dir), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    statuses = {int(k): v for k, v in summary["statuses"].items()}
    # Busy is the 500 "insufficient capacity" go-livepeer's client reads (the script counts
    # only those 500s as answers: any other is a failure, and the run did not fail).
    assert set(statuses) <= {200, 500}, statuses
    assert sum(statuses.values()) == 48
    assert statuses.get(200, 0) >= 1, "nothing was served"
    assert statuses.get(500, 0) >= 1, "24 clients against a queue of 2 should be refused"
    assert summary["retry_after_s"]["min"] >= 1
    assert summary["health"]["polls"] >= 1
    assert summary["health"]["ok"] == summary["health"]["polls"]
    assert summary["passed"] and not summary["failures"]
    assert summary["server_peak_rss_mib"] > 0


def misbehaving_app() -> FastAPI:
    """Answers in turn: a result, a 503 without Retry-After, a 500, a 503 with one."""
    app = FastAPI()
    calls = {"n": 0}

    @app.post("/text-to-image")
    async def generate():
        calls["n"] += 1
        kind = calls["n"] % 4
        if kind == 1:
            return {"images": []}
        if kind == 2:
            return JSONResponse({"detail": {"msg": "busy"}}, status_code=503)
        if kind == 3:
            return JSONResponse({"detail": {"msg": "boom"}}, status_code=500)
        return JSONResponse({"detail": {"msg": "busy"}}, status_code=503,
                            headers={"Retry-After": "2"})

    @app.get("/health")
    async def health():
        return {"status": "OK"}

    return app


def test_the_script_fails_a_server_that_breaks_the_invariants(tmp_path, capsys):
    loadtest = loadtest_module()
    out = tmp_path / "bad.json"
    with LiveServer(misbehaving_app()) as server:
        rc = loadtest.main(["--url", server.url, "--clients", "4", "--requests", "12",
                            "--json", str(out)])
    assert rc == 1
    summary = json.loads(out.read_text())
    failures = dict((f, n) for f, n in summary["failures"])
    assert failures.get("a 503 without Retry-After") == 3, failures
    assert any(f.startswith("status 500") for f in failures), failures
    assert summary["statuses"] == {"200": 3, "500": 3, "503": 6}
    assert "FAIL" in capsys.readouterr().out


def test_unanswered_requests_and_health_misses_fail_the_run():
    loadtest = loadtest_module()
    results = loadtest.Results(
        answers=[loadtest.Answer(200, 0.1), loadtest.Answer(0, 30.0, error="ReadTimeout()"),
                 loadtest.Answer(503, 0.01, retry_after="1")],
        health=[loadtest.Answer(200, 0.01), loadtest.Answer(0, 5.0, error="ReadTimeout()")])
    failures = loadtest.check(results, expected=3)
    assert any("no answer" in f for f in failures)
    assert any(f.startswith("/health poll") for f in failures)
    assert loadtest.check(loadtest.Results(answers=[loadtest.Answer(200, 0.1)],
                                           health=[loadtest.Answer(200, 0.01)]), 2)


@pytest.mark.parametrize("values, q, expected", [
    ([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 90, 4), ([5], 99, 5), (list(range(1, 101)), 99, 99),
])
def test_percentiles_are_nearest_rank(values, q, expected):
    assert loadtest_module().percentile(values, q) == expected


def test_a_busy_500_counts_as_an_answer_only_with_retry_after():
    loadtest = loadtest_module()
    busy = JSONResponse({"detail": {"msg": "insufficient capacity: queue full"}}, 500)
    response = httpx.Response(500, content=busy.body, headers={"content-type": "application/json"})
    assert loadtest.is_busy(response)
    assert not loadtest.is_busy(httpx.Response(500, json={"detail": {"msg": "boom"}}))
    results = loadtest.Results(answers=[loadtest.Answer(500, 0.1, "2", busy=True),
                                        loadtest.Answer(500, 0.1, None, busy=True)],
                               health=[loadtest.Answer(200, 0.01)])
    assert loadtest.check(results, expected=2) == ["a 500 without Retry-After"]
