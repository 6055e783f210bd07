"""scripts/bench.py as a user runs it: the CPU tiny-mode smoke writes a JSON report with the
per-stage times of its requests and the cache's costs; --full-size refuses to run without
CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bench(*args: str, tiny_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINY_DIR": str(tiny_dir), "DEVICE": "cpu",
           "TINY": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_text_to_image_writes_stages_to_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench("--pipeline", "text-to-image", "--requests", "1", "--json", str(out),
                   "--cache", tiny_dir=tmp_path / "tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| text-to-image |" in result.stdout  # the Markdown table
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["pipeline"] == "text-to-image" and run["mode"] == "tiny"
    assert run["first"]["status"] == 200
    assert run["steady"]["n"] == 1 and run["steady"]["failed"] == 0
    assert {"model", "denoise", "encode"} <= set(run["steady"]["stages"])
    assert {"model", "denoise", "encode"} <= set(run["first"]["stages"])
    assert run["cold"]["status"] == 200 and run["cold"]["stages"]["model"] > 0
    assert run["loads"] and all(m["measured_mib"] > 0 for m in run["loads"])
    assert run["peak_rss_mib"] > 0
    # --cache: every tier move was timed (the host tier is on for the benchmark even on CPU).
    assert "cache costs" in result.stdout
    cache = report["cache"]
    assert cache["bytes"] > 0 and all(cache["ms"][k] is not None and cache["ms"][k] >= 0
                                      for k in ("hit", "disk_load", "demote", "host_load",
                                                "drop"))


@pytest.mark.skipif("cuda_available()", reason="checks the refusal on a machine without CUDA")
def test_full_size_refuses_without_cuda(tmp_path):
    result = bench("--full-size", tiny_dir=tmp_path / "tiny", timeout=60)
    assert result.returncode != 0
    assert "--full-size" in result.stderr and "GPU" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "tiny").exists()  # refused before building or serving anything
