"""Benchmark pipelines through the real HTTP path: start-up (imports, warm models loaded), a
cold load of another model through the cache, a first request, then N steady-state requests,
with per-stage times (the Server-Timing header), load times, peak process memory and, on CUDA,
peak GPU memory, and the settings it ran with; printed as Markdown tables, and as JSON with
--json.

Models come from the environment as the runner reads it (`DEVICE`, `TINY`, `MODEL_DIR`): on a
machine without a GPU that is the CPU tiny mode, a fast smoke. --full-size (GPU) builds each
default model's published architecture with random weights (no download) and serves those;
--naive then also runs the plain diffusers/transformers path on the same weights.

    python scripts/bench.py                                       # tiny, text-to-image, CPU
    python scripts/bench.py --pipeline all --json bench.json      # every pipeline served here
    python scripts/bench.py --size 1024 --requests 10             # a GPU with /models
    python scripts/bench.py --full-size --pipeline all --naive    # a GPU, no weights needed
    .venv-tts/bin/python scripts/bench.py --pipeline text-to-speech
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import bench_fidelity  # noqa: E402
import bench_inputs  # noqa: E402
import bench_overhead  # noqa: E402
import bench_report  # noqa: E402
from _common import ROOT  # noqa: E402,F401  (puts the repo on sys.path)
from bench_inputs import Options  # noqa: E402

DATE = time.strftime("%Y-%m-%d")
COLD_MODEL = "stabilityai/sd-turbo"
TOO_SLOW = ("--full-size builds and serves the real architectures (SDXL's UNet alone has 2.6 B "
            "parameters): on a CPU that takes many minutes per request. Run it on a GPU, or "
            "pass --force to run it here anyway.")
NO_FULL_SIZE = {"llm": "Llama-3.1-8B is served by Ollama in production; not built here"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--pipeline", default="text-to-image",
                        help="a pipeline, a comma list, or all (those served here)")
    parser.add_argument("--model", default="", help="model_id for the timed requests")
    parser.add_argument("--cold-model", default="auto",
                        help="another model timed once as a cold load through the cache; "
                        "auto: stabilityai/sd-turbo for text-to-image in tiny mode, none "
                        "otherwise; '' for none")
    parser.add_argument("--requests", type=int, default=5, help="steady-state requests")
    parser.add_argument("--size", type=int, default=None,
                        help="image side (of the input image for image inputs); default: 64 "
                        "in tiny mode, the model's own size otherwise")
    parser.add_argument("--images", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None,
                        help="num_inference_steps; default: the model's own (models.yaml)")
    parser.add_argument("--audio-seconds", type=float, default=None,
                        help="audio-to-text input length; default 2 (tiny) or 60 s")
    parser.add_argument("--max-tokens", type=int, default=None, help="llm answer length")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--full-size", action="store_true",
                        help="serve full-size random-weight models built from the published "
                        "configs (GPU; no download)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="--full-size: keep the built weights here (and reuse them); "
                        "default: a temporary folder, deleted after each pipeline")
    parser.add_argument("--naive", action="store_true",
                        help="also time the plain library path on the same weights")
    parser.add_argument("--force", action="store_true", help="--full-size on a CPU anyway")
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="also measure the runner's own cost per request over this many "
                        "rounds (scripts/bench_overhead.py): the server's time outside the "
                        "model's stages, and for text-to-image the bare pipeline call plus "
                        "safety check interleaved with the requests")
    parser.add_argument("--ready", type=int, default=0, metavar="ROUNDS",
                        help="also time start-up as a process this many times "
                        "(scripts/bench_ready.py): `python -m runner` to its port's first "
                        "answer and to /health IDLE, against the bare libraries importing "
                        "and loading the same models, alternated")
    parser.add_argument("--cache", action="store_true",
                        help="also time the cache: a hit, loads from disk and from the host "
                        "tier, a demotion and a drop (first pipeline, its sd-turbo-like "
                        "non-default model)")
    return parser.parse_args(argv)


# -- one pipeline through the HTTP path ------------------------------------------------------

def cuda_in_use(service: Any) -> bool:
    return service.device.is_cuda


def cuda_peak_mib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def timed(client: Any, call: bench_inputs.Call, cuda: bool, plan: Plan | None = None) -> dict:
    """One request: status, wall time through the app, its Server-Timing stages (ms) and, on
    CUDA, the peak allocated while it ran (the runner resets the peak at each run). The
    answer is kept on `plan` (the last one is compared with the naive path's)."""
    started = time.perf_counter()
    response = call.send(client)
    if plan is not None and response.status_code == 200:
        plan.answer = response.json()
    record = {"status": response.status_code,
              "http_ms": (time.perf_counter() - started) * 1000,
              "stages": bench_overhead.server_timing(response.headers.get("server-timing", ""))}
    if response.status_code != 200:
        record["error"] = response.text[:300]
    if cuda:
        record["peak_cuda_mib"] = cuda_peak_mib()
    return record


def wait_ready(client: Any, timeout: float = 3600) -> str:
    """IDLE once the warm models are loaded and their TORCH_COMPILE warm-ups done (they run
    after LOADING, while /health says OK), or how start-up ended otherwise."""
    deadline = time.monotonic() + timeout
    while (status := client.get("/health").json()["status"]) in ("LOADING", "OK"):
        if time.monotonic() > deadline:
            return "TIMEOUT"
        time.sleep(0.02)
    return status


@dataclass
class Plan:
    """What to run for one pipeline. `options` and `cold_model` are completed once the app
    says whether it serves tiny models (see `complete`)."""

    pipeline: str
    options: Options
    cold_model: str
    requests: int
    settings: dict
    overhead: int = 0  # rounds of scripts/bench_overhead.py; 0: not measured
    answer: Any = None  # the last request's answer, for the fidelity comparison

    def complete(self, tiny: bool) -> None:
        self.options = bench_inputs.defaults(self.options, self.pipeline, tiny)
        if self.cold_model == "auto":  # a second tiny text-to-image model; real ones may be
            self.cold_model = (COLD_MODEL if tiny and self.pipeline == "text-to-image"  # absent
                               else "")


def serve_and_time(plan: Plan) -> dict:
    """Start the app, wait for its warm models, then the cold, first and steady requests."""
    from fastapi.testclient import TestClient

    from runner.app import create_app
    from runner.settings import Settings

    started = time.perf_counter()
    app = create_app(Settings(pipeline=plan.pipeline, health_probe_seconds=0, **plan.settings))
    service = app.state.service
    plan.complete(service.tiny)
    entry = service.registry.resolve(plan.pipeline, plan.options.model)
    cuda = cuda_in_use(service)
    run: dict[str, Any] = {"pipeline": plan.pipeline, "model": entry.id, "mode": service.mode,
                           "device": service.device.type,
                           "dtype": str(service.device.dtype(entry.dtype)).replace("torch.", ""),
                           "settings": settings_of(plan)}
    clock = bench_overhead.ServerClock(app)
    with TestClient(clock, raise_server_exceptions=False) as client:
        status = wait_ready(client)
        run["startup_s"] = time.perf_counter() - started
        if status != "IDLE":
            return {**run, "error": f"warm-up ended with /health {status} (see the log)"}
        if cuda:
            run["peak_cuda_load_mib"] = cuda_peak_mib()
        if plan.cold_model:
            cold = bench_inputs.request(plan.pipeline, Options(**{**vars(plan.options),
                                                                   "model": plan.cold_model}))
            run["cold_model"], run["cold"] = plan.cold_model, timed(client, cold, cuda)
        calls = [bench_inputs.request(plan.pipeline, plan.options, i)
                 for i in range(plan.requests + 1)]
        records = [timed(client, call, cuda, plan) for call in calls]
        if plan.overhead and records[-1]["status"] == 200:
            run["overhead"] = bench_overhead.measure(client, clock, service, plan.pipeline,
                                                     calls[-1], plan.overhead)
        described = client.get("/models").json()["models"]
    for record in [run.get("cold"), *records]:
        if record and record["status"] != 200:
            log(f"[{plan.pipeline}] HTTP {record['status']}: {record['error']}")
            break
    run["first"], run["requests"] = records[0], records[1:]
    run["steady"] = bench_report.steady_summary(records[1:])
    run["loads"] = [{"id": m["id"], "load_seconds": m["load_seconds"],
                     "estimated_mib": m["estimated_bytes"] / 2**20,
                     "measured_mib": (m["measured_bytes"] or 0) / 2**20} for m in described]
    run["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        run["peak_cuda_mib"] = max([r.get("peak_cuda_mib", 0.0) for r in records] or [0.0])
    run["model_dir"] = str(service.model_dir)
    return run


IMAGE_INPUTS = ("image-to-image", "image-to-video", "upscale", "image-to-text",
                "segment-anything-2")
DIFFUSION = ("text-to-image", "image-to-image", "image-to-video", "upscale")


def settings_of(plan: Plan) -> dict:
    """The request settings that apply to this pipeline (None: the model's default)."""
    o, p = plan.options, plan.pipeline
    values: dict[str, Any] = {"requests": plan.requests}
    if p in DIFFUSION or p in IMAGE_INPUTS:
        values["size"] = o.size or "model default"
    if p in ("text-to-image", "image-to-image"):
        values["images"] = o.images
    if p in DIFFUSION:
        values["steps"] = o.steps or "model default"
    if p == "audio-to-text":
        values["audio_seconds"] = o.audio_seconds
    if p == "llm":
        values["max_tokens"] = o.max_tokens
    return values


def release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- the naive baseline ----------------------------------------------------------------------

def naive(run: dict, plan: Plan, requests: int) -> dict:
    import bench_naive

    context = bench_naive.context(plan.pipeline, plan.options, Path(run["model_dir"]),
                                  run["device"])
    return bench_naive.measure(context, requests)


def with_naive(run: dict, plan: Plan) -> dict:
    release_memory()
    if run["mode"] == "tiny":
        from runner.device import configure_for_tiny

        configure_for_tiny()  # the runner's tiny mode runs one torch thread: so does naive
    log(f"[{plan.pipeline}] naive baseline on the same weights ...")
    result = naive(run, plan, plan.requests)
    last = result.pop("last_output", None)
    run["naive"] = result
    if plan.answer is not None and "error" not in result:
        run["fidelity"] = bench_fidelity.compare(
            plan.pipeline, bench_fidelity.runner_output(plan.pipeline, plan.answer),
            bench_fidelity.naive_output(plan.pipeline, last))
    runner_ms = (run["steady"]["http_ms"] or {}).get("median")
    if "error" not in result and result["steady_ms"] and runner_ms:
        run["naive_ratio"] = bench_report.summarize(result["steady_ms"])["median"] / runner_ms
    release_memory()
    return run


# -- full-size weights -----------------------------------------------------------------------

def full_size_settings(pipeline: str, options: Options, cold_model: str, weights: Path,
                       device: str) -> dict:
    """Build the full-size checkpoints this pipeline's run needs into `weights`; the runner
    settings that serve them."""
    import bench_fullsize

    from runner.registry import Registry
    from runner.settings import Settings
    from runner.spec import discover

    registry = Registry.load(Settings().models_file)
    entries = [registry.resolve(pipeline, options.model)]
    if cold_model not in ("", "auto"):  # auto: none with full-size models
        entries.append(registry.resolve(pipeline, cold_model))
    if "safety_check" in discover()[pipeline].Request.model_fields:
        entries.append(registry.safety_checker)
    for entry in entries:
        log(f"[{pipeline}] building a full-size random-weight {entry.kind} for {entry.id} ...")
        seconds = bench_fullsize.build(entry, weights, device)
        log(f"[{pipeline}]   " + ("reused" if seconds is None else f"built in {seconds:.1f}s"))
    return {"device": device, "tiny": False, "model_dir": weights}


# -- the whole run ---------------------------------------------------------------------------

def pipelines_to_run(spec: str) -> list[str]:
    from runner.spec import discover

    served = sorted(discover())
    if spec == "all":
        return served
    return [name.strip() for name in spec.split(",") if name.strip()]


def environment(mode: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "mode": mode, "threads": torch.get_num_threads(),
           "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    for name in ("diffusers", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    return env


def not_servable(pipeline: str) -> str | None:
    from runner.spec import discover

    if pipeline in discover():
        return None
    if pipeline in discover(installed_only=False):
        venv = " (text-to-speech: run with .venv-tts/bin/python)" \
            if pipeline == "text-to-speech" else ""
        return f"{pipeline} cannot be served from this environment{venv}"
    return f"unknown pipeline {pipeline!r}"


def bench_one(pipeline: str, args: argparse.Namespace, weights: Path | None,
              device: str) -> dict:
    from runner.errors import RunnerError

    full = args.full_size
    options = Options(size=args.size, images=args.images, steps=args.steps,
                      audio_seconds=args.audio_seconds, max_tokens=args.max_tokens,
                      model=args.model)
    cold = args.cold_model
    settings: dict = {}
    problem = not_servable(pipeline) or (full and NO_FULL_SIZE.get(pipeline))
    if problem:
        return {"pipeline": pipeline, "error": problem}
    try:
        if full:
            settings = full_size_settings(pipeline, options, cold, weights, device)
            release_memory()  # the build's peak is not the runner's
        plan = Plan(pipeline, options, cold, args.requests, settings, args.overhead)
        log(f"[{pipeline}] serving ({'full-size' if full else 'environment'} models) ...")
        run = serve_and_time(plan)
    except (ValueError, RunnerError, SystemExit) as exc:  # a bad --model; nothing to build
        return {"pipeline": pipeline, "error": getattr(exc, "msg", None) or str(exc)}
    except Exception as exc:  # noqa: BLE001  (an OOM building or serving: the next one runs)
        log(traceback.format_exc())
        release_memory()
        return {"pipeline": pipeline, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    release_memory()
    if args.naive and "error" not in run:
        run = with_naive(run, plan)
    if args.ready and "error" not in run:
        import bench_ready

        log(f"[{pipeline}] start-up as a process, {args.ready} round(s) ...")
        run["ready"] = bench_ready.measure(pipeline, options.model, settings, run["model_dir"],
                                           run["device"], args.ready)
    return run


def save(report: dict[str, Any], args: argparse.Namespace) -> None:
    modes = sorted({run["mode"] for run in report["runs"] if "mode" in run})
    report["environment"] = environment("full-size" if args.full_size else ", ".join(modes))
    if args.json:
        bench_report.write_json(report, args.json)
        log(f"wrote {args.json}")


def cache_costs(args: argparse.Namespace) -> dict:
    """The cache's own costs on the environment's models (tiny ones in tiny mode); a model
    that will not load is reported, not raised, so the report still gets written."""
    import bench_cache

    pipeline = pipelines_to_run(args.pipeline)[0]
    model = args.cold_model if args.cold_model != "auto" else COLD_MODEL
    try:
        return bench_cache.measure(pipeline, {}, model=model)
    except Exception as exc:  # noqa: BLE001
        log(f"cache costs not measured: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if args.full_size and not cuda and not args.force:
        print(f"error: {TOO_SLOW}", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    report: dict[str, Any] = {
        "date": DATE, "command": shlex.join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "runs": []}
    for pipeline in pipelines_to_run(args.pipeline):
        weights = args.weights_dir
        temporary = args.full_size and weights is None
        if temporary:
            weights = Path(tempfile.mkdtemp(prefix="bench-full-size-"))
        try:
            report["runs"].append(bench_one(pipeline, args, weights, device))
        finally:
            if temporary:
                shutil.rmtree(weights, ignore_errors=True)
        # after every pipeline: a run cut short (a time limit) keeps what finished
        save(report, args)
    print(bench_report.render(report))
    if args.cache:
        report["cache"] = cache_costs(args)
        if "error" not in report["cache"]:
            import bench_cache

            print("\n" + bench_cache.render(report["cache"]))
        save(report, args)
    failed = [r["pipeline"] for r in report["runs"]
              if "error" in r or r["first"]["status"] != 200 or r["steady"]["failed"]]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
