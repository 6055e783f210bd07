"""The one-shot GPU check: everything a rare, short GPU session should measure, in one
command that keeps what finished when it is cut short.

    scripts/gpu_check.sh OUT                # on the GPU machine (the wheels beside it)
    python scripts/gpu_check.py OUT --rehearse   # the same steps on this CPU, tiny models

Steps, in this order, each a child process with its own time limit (a hang loses that step,
not the run), each limited further by what is left of `--budget` seconds:
1. the environment: device, driver, torch and CUDA versions, the packages used;
2. `pytest -m gpu tests/gpu`: tiny models on CUDA through HTTP, estimates against the
   allocator's bytes, OOM recovery under a small budget;
3. the full-size random-weight benchmark, the runner against the naive library path in the
   same run, the pipelines that matter most first: text-to-image (RealVisXL at 1024x1024, its
   5 steps), audio-to-text (Whisper large-v3, 60 s), SAM2-L, then SDXL-Lightning 4-step,
   image-to-image and image-to-video while time remains. Weights are built
   on the GPU into `--weights-dir` (default: /dev/shm, memory, where saving and reading them
   back costs less than building them again);
4. while time remains, start-up as a process (bench.py --ready): `python -m runner` with the
   tiny text-to-image on this device, to its port's first answer and to IDLE, beside the bare
   libraries importing and loading the same model.

After every step OUT/gpu-check.json (every result) and OUT/gpu-check.md (the tables) are
written again. `--rehearse` runs the same steps on the CPU with the tiny models (pytest -m gpu
then collects nothing and says so), so the script cannot rot between GPU sessions; the test
suite runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "fastapi",
            "starlette", "pydantic", "av", "numpy", "pillow", "nvidia-ml-py", "peft")
RESERVE_S = 15  # left at the end of the budget for writing the report
# The rehearsal proves the steps run, not how fast this CPU is: its limits are many times what
# each step takes on a quiet 2-core machine (under a minute), so a busy or slower machine
# cannot fail it.
REHEARSAL_LIMIT_S = 600
REHEARSAL_BUDGET_S = 3000


@dataclass
class Step:
    """One child process: its command, its own time limit, the JSON it leaves behind."""

    name: str
    command: list[str]
    limit_s: float
    json: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the JSON and Markdown results")
    parser.add_argument("--rehearse", action="store_true",
                        help="the same steps on this CPU with the tiny models (no GPU needed)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default: 450 on a GPU, 280 rehearsing)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="where full-size weights are built (default: /dev/shm/...)")
    parser.add_argument("--requests", type=int, default=None,
                        help="steady requests per benchmark (default: 3; 1 rehearsing)")
    return parser.parse_args(argv)


# -- the steps ---------------------------------------------------------------------------------

# (step name, pipeline, model): the targets of docs/benchmarks.md first (RealVisXL, Whisper,
# SAM2-L), then SDXL-Lightning 4-step, then the rest while time remains.
BENCH_RUNS = [("text-to-image", "text-to-image", ""),
              ("audio-to-text", "audio-to-text", ""),
              ("segment-anything-2", "segment-anything-2", ""),
              ("text-to-image-lightning", "text-to-image", "ByteDance/SDXL-Lightning-4step"),
              ("image-to-image", "image-to-image", ""),
              ("image-to-video", "image-to-video", "")]


def steps(args: argparse.Namespace, weights: Path) -> list[Step]:
    python = sys.executable
    gpu_tests = Step("gpu-tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu",
                                   "-p", "no:cacheprovider",
                                   f"--junitxml={args.out / 'gpu-tests.xml'}"],
                     limit_s=REHEARSAL_LIMIT_S if args.rehearse else 120)
    out = [gpu_tests]
    requests = str(args.requests or (1 if args.rehearse else 3))
    for name, pipeline, model in BENCH_RUNS:
        json_path = args.out / f"bench-{name}.json"
        command = [python, "scripts/bench.py", "--naive", "--requests", requests,
                   "--pipeline", pipeline, "--cold-model", "", "--json", str(json_path)]
        if model:
            command += ["--model", model]
        if args.rehearse:
            env = {"TINY": "1", "DEVICE": "cpu", "TINY_DIR": str(weights),
                   "OMP_NUM_THREADS": "1"}
            limit = REHEARSAL_LIMIT_S
        else:
            command += ["--full-size", "--weights-dir", str(weights)]
            if pipeline == "audio-to-text":
                command += ["--audio-seconds", "60"]
            env, limit = {}, (150 if pipeline == "image-to-video" else 100)
        out.append(Step(f"bench {name}", command, limit, json_path, env))
    return out + [start_up(args, weights)]


def start_up(args: argparse.Namespace, weights: Path) -> Step:
    """Last, while time remains: `python -m runner` spawned twice, to its port's first answer
    and to IDLE, beside the bare libraries' floor (bench.py --ready), tiny text-to-image on
    this machine's device: the runner's own start-up, CUDA's initialization included."""
    json_path = args.out / "bench-start-up.json"
    command = [sys.executable, "scripts/bench.py", "--requests", "1", "--cold-model", "",
               "--pipeline", "text-to-image", "--ready", "2", "--json", str(json_path)]
    env = {"TINY": "1", "TINY_DIR": str(weights if args.rehearse else weights / "tiny")}
    if args.rehearse:
        env.update(DEVICE="cpu", OMP_NUM_THREADS="1")
    return Step("start-up", command, REHEARSAL_LIMIT_S if args.rehearse else 90, json_path, env)


def run_step(step: Step, limit_s: float, log: Path) -> dict:
    """The step's command under min(its limit, what is left); its output goes to `log`."""
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])), **step.env}
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(step.command, cwd=ROOT, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=limit_s)
            status, code = ("ok" if proc.returncode == 0 else "failed"), proc.returncode
        except subprocess.TimeoutExpired:
            status, code = "timed out", None
    result = {"step": step.name, "status": status, "exit_code": code,
              "seconds": round(time.monotonic() - started, 1), "limit_s": round(limit_s),
              "command": " ".join(step.command), "log": log.name}
    if step.name == "gpu-tests":
        result.update(junit_counts(Path(step.command[-1].split("=", 1)[1])))
        if code == 0 and result.get("tests") == result.get("skipped"):
            result["status"] = "skipped: no CUDA here"
    if step.json is not None and step.json.is_file():
        result["report"] = json.loads(step.json.read_text())
    return result


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file."""
    import xml.etree.ElementTree as ElementTree

    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


# -- the environment ---------------------------------------------------------------------------

def environment() -> dict:
    env: dict = {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "packages": {}}
    for name in PACKAGES:
        try:
            env["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["packages"][name] = None
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = props.name
            env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            env["capability"] = f"{props.major}.{props.minor}"
    except ImportError:
        env["cuda_available"] = False
    env["driver"] = nvidia_smi("driver_version")
    return env


def nvidia_smi(field_name: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# -- the report --------------------------------------------------------------------------------

def write(out: Path, report: dict) -> None:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    import bench_report

    env = report["environment"]
    lines = [f"# GPU check ({'rehearsal on the CPU' if report['rehearse'] else 'GPU'})", "",
             f"Date: {report['date']} · device: {env.get('device', 'CPU')} · driver: "
             f"{env.get('driver') or '–'} · torch {env['packages'].get('torch')} (CUDA "
             f"{env.get('torch_cuda') or '–'}) · Python {env['python']}", "",
             "Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v),
             "", bench_report.table(["step", "status", "seconds", "limit s", "log"], [
                 [r["step"], status_text(r), str(r["seconds"]), str(r["limit_s"]), r["log"]]
                 for r in report["steps"]]), ""]
    for result in report["steps"]:
        if result.get("report", {}).get("runs"):
            lines += [f"## {result['step']}", "", bench_report.render(result["report"]), ""]
    return "\n".join(lines)


def status_text(result: dict) -> str:
    if "tests" not in result:
        return result["status"]
    counts = ", ".join(f"{result[k]} {k}" for k in ("tests", "failures", "errors", "skipped")
                       if result.get(k))
    return f"{result['status']} ({counts})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (REHEARSAL_BUDGET_S if args.rehearse else 450.0)
    deadline = time.monotonic() + budget
    weights = args.weights_dir or default_weights_dir(args.rehearse, args.out)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rehearse": args.rehearse, "budget_s": budget, "weights_dir": str(weights),
              "environment": environment(), "steps": []}
    print(json.dumps(report["environment"], indent=2), flush=True)
    write(args.out, report)
    for step in steps(args, weights):
        left = deadline - time.monotonic() - RESERVE_S
        if left < 10:
            report["steps"].append({"step": step.name, "status": "not run: out of time",
                                    "seconds": 0, "limit_s": 0, "log": "–"})
            continue
        print(f"[gpu-check] {step.name} (up to {min(step.limit_s, left):.0f} s) ...", flush=True)
        log = args.out / f"{step.name.replace(' ', '-')}.log"
        result = run_step(step, min(step.limit_s, left), log)
        print(f"[gpu-check] {step.name}: {result['status']} in {result['seconds']} s",
              flush=True)
        report["steps"].append(result)
        write(args.out, report)
    write(args.out, report)
    print((args.out / "gpu-check.md").read_text())
    failed = [r["step"] for r in report["steps"] if r["status"] in ("failed", "timed out")]
    return 1 if failed else 0


def default_weights_dir(rehearse: bool, out: Path) -> Path:
    """Rehearsing: tiny models beside the results. On a GPU: /dev/shm (memory) when it has
    room for the largest set (SDXL at fp16 is about 7 GiB with its safety checker)."""
    if rehearse:
        return out / "tiny-models"
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 24 << 30:
        return shm / "gpu-check-weights"
    return Path(tempfile.gettempdir()) / "gpu-check-weights"


if __name__ == "__main__":
    sys.exit(main())
