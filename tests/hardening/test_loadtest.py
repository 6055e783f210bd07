"""scripts/loadtest.py: a small run against a spawned tiny-mode runner keeps the invariants
(every request answered with 200, or 503 with Retry-After; every /health poll answered), and
the script fails a server that breaks them. No durations are asserted."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

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


def run_script(tmp_path, *args: str) -> tuple[dict, str]:
    """scripts/loadtest.py with `args`, its /health polls given as long as a hang allows: it
    must exit 0; its JSON report and what it printed."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--health-timeout", str(HANG_S), "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_spawned_runner_under_load_answers_every_request(hardening_dir, tmp_path):
    # Every /health poll must be answered, however slowly this machine answers it (the 5 s
    # go-livepeer allows is the script's default, for a runner on its own machine).
    summary, _ = run_script(tmp_path, "--spawn", "--clients", "24", "--requests", "48",
                         "--max-queue", "2", "--health-interval", "0.1",
                         "--tiny-dir", str(hardening_dir))
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


# -- the soak (--soak: scripts/soak.py, scripts/soak_mix.py) ----------------------------------

def soak_modules():
    loadtest_module()  # scripts/ on sys.path, and `loadtest` the module soak imports
    return importlib.import_module("soak_mix"), importlib.import_module("soak")


def test_a_soak_round_covers_every_pipeline_bad_inputs_and_vanishing_clients():
    mix, _ = soak_modules()
    pipelines = ["audio-to-text", "image-to-image", "image-to-text", "image-to-video", "llm",
                 "segment-anything-2", "text-to-image", "text-to-speech", "upscale"]
    round_ = mix.items(pipelines)
    for pipeline in pipelines:
        mine = [i for i in round_ if i.pipeline == pipeline]
        assert {i.kind for i in mine} == set(mix.Kind), pipeline
        leaves = {i.leave for i in mine}
        assert {mix.Leave.CUT_UPLOAD, mix.Leave.BEFORE_ANSWER, mix.Leave.SILENT} <= leaves
        bad = {i.name for i in mine if i.kind is mix.Kind.BAD}
        assert {"unknown-model", "out-of-range"} <= bad, pipeline
        uploads = any(i.body.files for i in mine if i.kind is mix.Kind.SAMPLE)
        assert bad >= ({"not-media", "empty-file", "truncated"} if uploads else
                       {"malformed-json"}), pipeline
    chat = {(i.route, i.kind, i.name) for i in round_ if i.pipeline == "llm"}
    assert {("/llm", mix.Kind.SAMPLE, "stream"), ("/v1/chat/completions", mix.Kind.SAMPLE,
            "sample"), ("/llm", mix.Kind.VANISH, "mid-stream")} <= chat
    assert any(i.name == "large-upload" for i in round_)
    dealt = mix.deck(pipelines, seed=1)
    numbered = [next(dealt) for _ in range(len(round_) + 1)]
    assert [n for n, _ in numbered] == [0] * len(round_) + [1]
    first = [(i.pipeline, i.label) for _, i in numbered[:-1]]
    listed = [(i.pipeline, i.label) for i in round_]
    assert len(set(listed)) == len(listed)
    assert sorted(first) == sorted(listed), "a round deals every item once"
    assert first != listed, "in a fresh order"


def test_a_short_soak_of_a_spawned_runner_passes(hardening_dir, tmp_path):
    """The real runner answers the mix as the soak expects (results, 4xx for every bad input,
    vanishing clients released: IDLE after), and the report says so. The soak always finishes
    its first round, however slow the machine."""
    summary, printed = run_script(tmp_path, "--soak", "--duration", "2", "--warmup", "0",
                         "--rss-interval", "1", "--pipelines", "text-to-image",
                         "--tiny-dir", str(hardening_dir))
    assert summary["passed"] and summary["other_5xx"] == 0
    assert summary["rounds"] >= 1 and summary["first_round_done_at_s"] is not None
    counts = summary["by_route"]["/text-to-image"]
    assert set(counts) == {"sample", "bad", "vanish"}, counts
    assert {int(k.split()[0]) for k in counts["bad"]} <= set(range(400, 500)), counts
    main = summary["runners"]["main"]
    assert main["idle_after_s"] is not None and len(main["rss"]["samples"]) >= 2
    assert "| main | 1 |" in printed  # the Markdown table


def fake_runner(fail_every: int = 0) -> FastAPI:
    """/text-to-image as the runner answers the soak's items: 422 for bad JSON or a width
    below 64, 400 for an unknown model, else a result or, every other time, busy (a 500 that
    says so, with Retry-After); with `fail_every`, every so many a plain 500 instead."""
    app = FastAPI()
    calls = {"n": 0}

    @app.post("/text-to-image")
    async def generate(request: Request):
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:  # a vanishing client of the soak
            return Response(status_code=499)
        except ValueError:
            return JSONResponse({"detail": [{"msg": "invalid JSON"}]}, 422)
        if body.get("model_id") == "nobody/no-such-model":
            return JSONResponse({"detail": {"msg": "model_id: unknown"}}, 400)
        if body.get("width", 64) < 64:
            return JSONResponse({"detail": [{"msg": "width >= 64"}]}, 422)
        calls["n"] += 1
        if fail_every and calls["n"] % fail_every == 0:
            return JSONResponse({"detail": {"msg": "boom"}}, 500)
        if calls["n"] % 2:
            return JSONResponse({"detail": {"msg": "insufficient capacity: queue full"}}, 500,
                                headers={"Retry-After": "1"})
        return {"images": []}

    @app.get("/health")
    async def health():
        return {"status": "IDLE"}

    return app


def soak_against(app: FastAPI) -> dict:
    """A 3 s soak of text-to-image against `app` (this process's RSS sampled), reported."""
    _, soak = soak_modules()
    args = loadtest_module().parse_args([
        "--soak", "--duration", "3", "--rss-interval", "0.5", "--warmup", "0",
        "--pipelines", "text-to-image", "--health-timeout", str(HANG_S)])
    with LiveServer(app) as server:
        trace = soak.observe([soak.Served("main", ["text-to-image"], server.url, os.getpid(),
                                          0.0)], args)
    return soak.report(trace, args)


def test_a_soak_counts_every_kind_of_request_and_passes_busy():
    summary = soak_against(fake_runner())
    assert summary["passed"], summary["failures"]
    counts = summary["by_route"]["/text-to-image"]
    assert {"200", "500 busy"} <= set(counts["sample"]), counts
    assert set(counts["bad"]) == {"400", "422"}, counts
    assert set(counts["vanish"]) == {"left"}, counts
    assert set(summary["by_route"]["/health"]["vanish"]) == {"left"}
    main = summary["runners"]["main"]
    assert main["health"]["polls"] >= 1 and main["health"]["ok"] == main["health"]["polls"]
    assert len(main["rss"]["samples"]) >= 3 and main["rss"]["warm_mib"] > 0
    assert summary["other_5xx"] == 0


def test_a_soak_fails_on_a_5xx_that_is_not_busy():
    summary = soak_against(fake_runner(fail_every=5))
    assert not summary["passed"]
    assert summary["other_5xx"] >= 1
    assert any("sample:sample: 500 " in failure for failure, _ in summary["failures"]), \
        summary["failures"]


def test_rss_growth_is_measured_from_the_end_of_the_warm_up():
    _, soak = soak_modules()
    mib = 2**20
    samples = [(0.0, 100 * mib), (10.0, 200 * mib), (20.0, 200 * mib), (30.0, 210 * mib),
               (40.0, 220 * mib)]
    rss = soak.rss_summary(samples, warm_at=15.0)
    assert (rss["warm_at_s"], rss["warm_mib"], rss["end_mib"]) == (20.0, 200, 220)
    assert rss["growth_mib"] == 20 and rss["growth_mib_per_h"] == pytest.approx(3600)
    assert rss["slope_mib_per_h"] == pytest.approx(3600)
    assert soak.rss_summary(samples, warm_at=45.0)["growth_mib"] is None
