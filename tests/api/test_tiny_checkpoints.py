"""Tiny checkpoints are the runner's own cache: checked like MODEL_DIR's, and a broken one is
written again (said once in the log) instead of a 500 for a model asked by id, or an ERROR
loop for a warm default."""

from __future__ import annotations

import logging

from runner.hub import find_snapshot
from tests.conftest import png_bytes, serving

PIPELINE = "image-to-text"
DEFAULT = "Salesforce/blip-image-captioning-large"
OTHER = "Salesforce/blip-image-captioning-base"
PNG = ("a.png", png_bytes(), "image/png")


def truncate(tiny_dir, repo: str) -> None:
    snapshot = find_snapshot(tiny_dir, repo)
    assert snapshot is not None
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def caption(client, model_id: str = ""):
    return client.post(f"/{PIPELINE}", files={"image": PNG}, data={"model_id": model_id})


def test_a_truncated_tiny_checkpoint_is_written_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="runner")
    with serving(PIPELINE, tmp_path) as client:
        assert caption(client, OTHER).status_code == 200
    truncate(tmp_path, DEFAULT)
    truncate(tmp_path, OTHER)
    caplog.clear()
    # The warm default is rebuilt before it loads: IDLE, not an ERROR loop (serving asserts).
    with serving(PIPELINE, tmp_path) as client:
        assert caption(client).status_code == 200
        r = caption(client, OTHER)
        assert r.status_code == 200, r.text
        assert caption(client, OTHER).status_code == 200
    broken = [r.getMessage() for r in caplog.records if "are broken" in r.getMessage()]
    assert len(broken) == 2, broken
    assert any(DEFAULT in m for m in broken) and any(OTHER in m for m in broken)
    assert "model.safetensors" in broken[0]
