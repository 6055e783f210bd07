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

from tests.support.helpers import patient

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bench(*args: str, tiny_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINY_DIR": str(tiny_dir), "DEVICE": "cpu",
           "TINY": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_text_to_image_writes_stages_to_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench("--pipeline", "text-to-image", "--requests", "1", "--json", str(out),
                   "--cache", "--ready", "1", tiny_dir=tmp_path / "tiny",
                   timeout=patient(45))  # 44 s on a quiet machine
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
    # --ready: `python -m runner` spawned and seen IDLE, and the bare libraries' floor loaded
    ready = run["ready"]
    assert "error" not in ready, ready
    assert ready["rounds"] == 1 and "Start-up as a process" in result.stdout
    assert 0 < ready["port_s"][0] <= ready["ready_s"][0] and ready["floor_s"][0] > 0


@pytest.mark.skipif("cuda_available()", reason="checks the refusal on a machine without CUDA")
def test_full_size_refuses_without_cuda(tmp_path):
    result = bench("--full-size", tiny_dir=tmp_path / "tiny", timeout=patient(4))  # 3.5 s
    assert result.returncode != 0
    assert "--full-size" in result.stderr and "GPU" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "tiny").exists()  # refused before building or serving anything


def test_the_naive_baseline_runs_in_float32_from_half_precision_snapshots(tmp_path):
    """The full-size snapshots are saved at the serving dtype (float16): the naive path must
    still load float32 everywhere, or a float16 text encoder meets a float32 UNet."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_inputs
    import bench_naive

    from pipelines import _diffusion as diffusion
    from pipelines.image_to_text import tiny_captioner
    from runner.registry import ModelEntry

    sd = diffusion.tiny_sd_pipeline().to(torch.float16)
    diffusion.save_pipeline(sd, tmp_path / "sd")
    blip, processor = tiny_captioner()
    blip.to(torch.float16).save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    image = bench_inputs.Call("/image-to-text", files={
        "image": ("a.png", bench_inputs.noise_png(32, 32), "image/png")})
    options = bench_inputs.Options(size=64, steps=1)
    contexts = {pipeline: bench_naive.Context(
        pipeline, ModelEntry(id="a/b", kind="sd", pipeline=pipeline), tmp_path / folder, "cpu",
        options, lambda i: image) for pipeline, folder in (("text-to-image", "sd"),
                                                            ("image-to-text", "blip"))}
    for pipeline, c in contexts.items():
        assert bench_naive.NAIVE[pipeline](c)(0)
    loaded = bench_naive.diffusers_pipe(type(sd), contexts["text-to-image"])
    assert {p.dtype for p in loaded.text_encoder.parameters()} == {torch.float32}


def test_a_pipeline_that_fails_does_not_lose_the_others(tmp_path, monkeypatch):
    """A GPU run is paid for by the minute: an out-of-memory error in one pipeline is its
    result, the next pipeline still runs, and the JSON on disk grows after each one."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    served = []

    def serve_and_time(plan):
        served.append(plan.pipeline)
        assert (tmp_path / "b.json").exists() == (len(served) > 1)
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "serve_and_time", serve_and_time)
    code = bench.main(["--pipeline", "text-to-image,image-to-image", "--json",
                       str(tmp_path / "b.json")])
    assert code == 1 and served == ["text-to-image", "image-to-image"]
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [r["error"] for r in runs] == ["RuntimeError: CUDA out of memory. Tried to allocate "
                                          "20.00 GiB"] * 2


def test_the_gpu_machine_wheels_are_the_pinned_versions():
    from packaging.utils import canonicalize_name

    def pins(path: Path) -> dict[str, str]:
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {canonicalize_name(name): version for name, _, version in
                (line.partition("==") for line in lines if "==" in line)}

    wanted = pins(ROOT / "scripts" / "gpu-machine-wheels.txt")
    pinned = pins(ROOT / "constraints.txt")
    assert {"diffusers", "fastapi", "transformers", "av"} <= set(wanted)
    assert {name: v for name, v in wanted.items() if pinned.get(name) != v} == {}
