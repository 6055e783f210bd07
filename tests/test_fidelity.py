"""On this CPU, the answers of the pipelines gpu_check's rehearsal does not cover equal the
plain library call's on the same weights, seed and settings (scripts/bench.py --naive runs
both and scripts/bench_fidelity.py compares them; text-to-speech: tests/tts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.support.helpers import patient

ROOT = Path(__file__).resolve().parent.parent


def test_captions_llm_answers_and_upscales_equal_the_library_calls(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINY": "1", "DEVICE": "cpu",
           "TINY_DIR": str(tmp_path / "tiny")}
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--naive", "--requests", "1", "--cold-model", "",
         "--pipeline", "image-to-text,llm,upscale", "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=patient(60))  # 60 s on a quiet machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {run["pipeline"]: run for run in json.loads(out.read_text())["runs"]}
    assert runs["image-to-text"]["fidelity"]["value"] == 1.0  # the same caption
    assert runs["llm"]["fidelity"]["value"] == 1.0  # the same greedy tokens
    assert runs["upscale"]["fidelity"]["value"] == math.inf  # the same pixels
