"""Start-up as an operator sees it, for scripts/bench.py --ready: `python -m runner` spawned
for one pipeline and timed to its port's first answer (go-livepeer's first health check
passes there) and to /health IDLE (the warm models loaded: go-livepeer hands the container
back to its pool), against the floor any server of the same libraries pays, measured in the
same rounds, alternated:

- **library floor**: a bare process that imports the libraries and loads the same folders
  with the plain library calls (scripts/bench_naive.py's loader for the pipeline, and the
  safety checker where the pipeline checks images), from spawn to loaded. The bench's own
  helpers (argument handling, naming the folders) are imported first and left out of it, so
  the floor is a lower bound: the modules they share with the libraries (PIL, numpy,
  pydantic) count for the runner only.
- **runner's own** = runner IDLE - library floor: the web stack, the app, the lifecycle.

/health is polled every `POLL_S` (see `_common.spawned_runner`).

    python scripts/bench_ready.py --floor PIPELINE MODEL_DIR DEVICE [MODEL]   # the child
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the floor child's first moment: what follows is its helpers'

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from _common import ROOT, spawned_runner  # noqa: E402

SCRIPT = Path(__file__).resolve()
POLL_S = 0.1
TIMEOUT_S = 600.0
FLOOR_LINE = '{"helpers_s"'  # the child's one line, once its models are loaded


def runner_env(pipeline: str, model: str, settings: dict) -> dict[str, str]:
    """The environment that gives `python -m runner` the Settings fields bench.py serves with
    (each field's variable is its name in capitals)."""
    env = {**os.environ, "PIPELINE": pipeline}
    env.update({key.upper(): str(int(value) if isinstance(value, bool) else value)
                for key, value in settings.items()})
    if model:
        env["MODEL_ID"] = model
    return env


def runner_start(pipeline: str, model: str, settings: dict) -> dict[str, Any]:
    """Seconds from spawning `python -m runner` to its port's first answer and to IDLE."""
    with tempfile.TemporaryFile("w+") as log:
        try:
            with spawned_runner(runner_env(pipeline, model, settings), log, TIMEOUT_S,
                                poll=POLL_S) as runner:
                return {"port_s": runner.port_s, "ready_s": runner.ready_s}
        except (RuntimeError, TimeoutError) as exc:
            log.seek(0)
            return {"error": f"{exc}: {log.read()[-400:]}"}


def library_floor(pipeline: str, model_dir: str, device: str, model: str) -> dict[str, Any]:
    """Seconds from spawning the bare child to its models loaded, less its helpers' imports."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--floor", pipeline, model_dir, device, model],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = "-"
        while proc.stdout and line and not line.startswith(FLOOR_LINE):  # skip library chatter
            line = proc.stdout.readline()
        loaded = time.perf_counter() - started
    finally:
        proc.kill()  # its exit (tearing down torch) is no part of anyone's start-up
        _, err = proc.communicate(timeout=30)
    if not line.startswith(FLOOR_LINE):
        return {"error": f"the library floor failed: {err[-400:]}"}
    return {"floor_s": loaded - json.loads(line)["helpers_s"]}


def measure(pipeline: str, model: str, settings: dict, model_dir: str, device: str,
            rounds: int) -> dict[str, Any]:
    """`rounds` alternated runner starts and library floors; medians and the spread."""
    starts, floors = [], []
    for _ in range(rounds):
        starts.append(runner_start(pipeline, model, settings))
        floors.append(library_floor(pipeline, model_dir, device, model))
        for part in (starts[-1], floors[-1]):
            if "error" in part:
                return {"error": part["error"]}
    port, ready = [s["port_s"] for s in starts], [s["ready_s"] for s in starts]
    floor = [f["floor_s"] for f in floors]
    return {"rounds": rounds, "poll_s": POLL_S, "port_s": port, "ready_s": ready,
            "floor_s": floor,
            "own_s": statistics.median(ready) - statistics.median(floor)}


# -- the child: the plain libraries, nothing of the runner's serving ---------------------------

def floor_child(pipeline: str, model_dir: str, device: str, model: str) -> None:
    import bench_inputs
    import bench_naive

    from runner.registry import Registry
    from runner.settings import Settings

    context = bench_naive.context(pipeline, bench_inputs.Options(model=model),
                                  Path(model_dir), device)
    bench_inputs.sample(pipeline, context.options)  # the spec read: a helper, not a library
    checker = Registry.load(Settings().models_file).safety_checker.main
    checks = bench_inputs.spec_of(pipeline).checks_safety
    helpers_s = time.perf_counter() - STARTED
    bench_naive.NAIVE[pipeline](context)
    if checks:
        bench_naive.safety_checker(context.files.folder(checker.repo, checker.revision), device)
    print(json.dumps({"helpers_s": helpers_s}), flush=True)
    time.sleep(TIMEOUT_S)  # killed by the parent


if __name__ == "__main__":
    if sys.argv[1:2] != ["--floor"] or len(sys.argv) not in (5, 6):
        sys.exit(__doc__.rsplit("\n\n", 1)[1])
    floor_child(*sys.argv[2:5], sys.argv[5] if len(sys.argv) == 6 else "")
