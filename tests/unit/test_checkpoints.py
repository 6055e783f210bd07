"""runner/checkpoints.py: what an interrupted download leaves behind is found offline, file by
file, before anything is loaded."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from runner import checkpoints
from runner.hub import writing_snapshot
from runner.registry import ModelEntry

ENTRY = ModelEntry(id="org/model", kind="test")


def snapshot(model_dir, files: dict[str, bytes]) -> None:
    with writing_snapshot(model_dir, "org/model") as folder:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)


@pytest.fixture
def weights(tmp_path) -> bytes:
    save_file({"w": torch.arange(64, dtype=torch.float32)}, tmp_path / "w.safetensors")
    return (tmp_path / "w.safetensors").read_bytes()


def test_a_whole_snapshot_has_no_problem(tmp_path, weights):
    snapshot(tmp_path, {"config.json": b"{}", "model.safetensors": weights})
    assert checkpoints.entry_problems(ENTRY, tmp_path) == []


@pytest.mark.parametrize("cut, says", [
    (lambda w: w[:-1], "truncated: 327 bytes, its header describes 328"),
    (lambda w: w + b"\0", "longer than its header says"),
    (lambda w: w[:5], "shorter than a safetensors header"),
    (lambda w: w[:40], "the file ends inside its header"),
])
def test_a_cut_safetensors_is_named(tmp_path, weights, cut, says):
    assert len(weights) == 328  # 8 + a 64-byte header + 64 floats
    snapshot(tmp_path, {"config.json": b"{}", "model.safetensors": cut(weights)})
    (problem,) = checkpoints.entry_problems(ENTRY, tmp_path)
    assert problem.startswith("org/model/model.safetensors: ") and says in problem, problem


def test_a_cut_json_and_a_cut_zip_checkpoint_are_named(tmp_path):
    torch.save({"w": torch.zeros(256)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    assert zipfile.is_zipfile(tmp_path / "whole.pt")
    snapshot(tmp_path / "m", {"config.json": json.dumps({"a": 1}).encode()[:5],
                              "model.pt": whole[: len(whole) // 2]})
    problems = checkpoints.entry_problems(ENTRY, tmp_path / "m")
    assert "org/model/config.json: not valid JSON (truncated?)" in problems
    assert "org/model/model.pt: truncated: the zip archive has no end" in problems
    snapshot(tmp_path / "ok", {"config.json": b"{}", "model.pt": whole})
    assert checkpoints.entry_problems(ENTRY, tmp_path / "ok") == []


def test_a_link_to_a_missing_blob_and_an_empty_snapshot_are_named(tmp_path, weights):
    snapshot(tmp_path, {"config.json": b"{}", "model.safetensors": weights})
    (folder,) = (tmp_path / "models--org--model" / "snapshots").iterdir()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs-gone" / "abc")
    problems = checkpoints.entry_problems(ENTRY, tmp_path)
    assert "org/model/model.safetensors: a link to a missing file (an interrupted download?)" \
        in problems
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    assert checkpoints.entry_problems(ENTRY, tmp_path) == ["org/model: no weights in the snapshot"]


def test_an_ollama_manifest_cut_short_is_named(tmp_path):
    manifest = checkpoints.ollama_manifest(tmp_path, "llama3.1:8b")
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"layers": [')
    (problem,) = checkpoints.ollama_problems("llama3.1:8b", tmp_path)
    assert "manifest" in problem and "not valid JSON" in problem
