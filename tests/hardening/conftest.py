"""Fixtures of the hardening suite: one tiny-mode app serving every pipeline of this
environment plus the echo test pipeline, shared by the whole suite (each tiny checkpoint is
written and loaded once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from runner.settings import REPO_ROOT
from tests.conftest import ECHO_MODELS, echo_modules, serving

# Audio longer than this is refused; small here so the over-limit cases cost little to build.
AUDIO_MAX_SECONDS = 60


def hardening_models(folder: Path) -> Path:
    """models.yaml plus the echo pipeline's entries, with a short audio limit."""
    spec = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())
    spec["pipelines"].update(yaml.safe_load(ECHO_MODELS.read_text())["pipelines"])
    for entry in spec["pipelines"]["audio-to-text"]["models"]:
        entry.setdefault("options", {})["max_seconds"] = AUDIO_MAX_SECONDS
    path = folder / "models-hardening.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def hardening_dir(tmp_path_factory) -> Path:
    """The suite's tiny-model folder (MODEL_DIR of the shared app and of the load test)."""
    return tmp_path_factory.mktemp("tiny-models-hardening")


@pytest.fixture(scope="session")
def models_file(tmp_path_factory) -> Path:
    return hardening_models(tmp_path_factory.mktemp("models-file"))


@pytest.fixture(scope="session")
def runner(hardening_dir, models_file) -> Iterator[TestClient]:
    """Every pipeline served here (text-to-speech lives in its own environment) and the echo
    pipeline, in one app, ready."""
    with serving("all", hardening_dir, echo_modules(), models_file=models_file,
                 health_probe_seconds=0) as client:
        yield client
