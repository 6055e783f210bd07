"""runner.settings (environment knobs) and runner.hub (where model files are found)."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from runner.errors import ModelLoadError
from runner.hub import (
    ModelFiles,
    find_snapshot,
    is_repo_id,
    repo_folder,
    snapshot,
    writing_snapshot,
)
from runner.registry import Source
from runner.settings import OPTIMISATION_FLAGS, Settings

# -- settings ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ["PIPELINE", "MODEL_ID", "VRAM_BUDGET", "MAX_QUEUE", "SAFETY_POLICY", "DEVICE",
                 "HOST", "PORT", "TINY", "VERSION", "VERBOSE_LOGGING",
                 *OPTIMISATION_FLAGS]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("raw, stored, names", [
    ("a, b", "a,b", ["a", "b"]),
    (" text-to-image ,upscale ,", "text-to-image,upscale", ["text-to-image", "upscale"]),
    ("audio-to-text", "audio-to-text", ["audio-to-text"]),
    ("all", "all", ["x", "y"]),
    ("", "all", ["x", "y"]),
    (" , ", "all", ["x", "y"]),
])
def test_pipeline_list_is_normalised(clean_env, raw, stored, names):
    settings = Settings(pipeline=raw)
    assert settings.pipeline == stored
    assert settings.pipeline_names(["x", "y"]) == names


def test_settings_read_the_environment(clean_env):
    clean_env.setenv("PIPELINE", "a, b")
    clean_env.setenv("VRAM_BUDGET", "2GiB")
    clean_env.setenv("MAX_QUEUE", "3")
    clean_env.setenv("SAFETY_POLICY", "blur")
    settings = Settings()
    assert settings.pipeline == "a,b"
    assert settings.pipeline_names([]) == ["a", "b"]
    assert int(settings.vram_budget) == 2 << 30
    assert settings.max_queue == 3
    assert settings.safety_policy == "blur"


def test_defaults_without_environment(clean_env):
    settings = Settings()
    assert settings.pipeline == "all"
    assert settings.vram_budget is None
    assert settings.safety_policy == "black"
    assert settings.max_queue >= 0


@pytest.mark.parametrize("name, value", [("SAFETY_POLICY", "pixelate"), ("MAX_QUEUE", "-1"),
                                         ("DEVICE", "tpu")])
def test_bad_values_are_rejected(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_environment_variables_are_ignored(clean_env):
    clean_env.setenv("SOME_UNRELATED_VARIABLE", "x")
    clean_env.setenv("PIPELINES", "text-to-image")  # a typo of PIPELINE
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert Settings().pipeline == "all"


def test_unimplemented_optimisation_flag_is_logged(clean_env, caplog):
    clean_env.setenv("SFAST", "true")
    with caplog.at_level(logging.WARNING, logger="runner.settings"):
        Settings().log_optimisation_flags()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SFAST" in warnings[0].getMessage() and "true" in warnings[0].getMessage()


def test_no_flags_no_warnings(clean_env, caplog):
    with caplog.at_level(logging.WARNING, logger="runner.settings"):
        Settings().log_optimisation_flags()
    assert not caplog.records


# -- repo ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["org/name", "name", "CompVis/stable-diffusion-safety-checker",
                                  "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  "SG161222/RealVisXL_V4.0_Lightning", "a.b/c_d-e"])
def test_repo_ids_accepted(name):
    assert is_repo_id(name)


@pytest.mark.parametrize("name", ["../x", "x/..", "org/../name", "..", "/abs", "/abs/path",
                                  "http://x", "https://huggingface.co/org/name", "a/b/c", "",
                                  "org/", "/name", ".hidden/x", "org/-x", "org name/x",
                                  "C:\\models\\x", "org/" + "n" * 97])
def test_repo_ids_rejected(name):
    assert not is_repo_id(name)


def test_repo_id_with_trailing_newline_is_rejected():
    assert not is_repo_id("org/name\n")


# -- snapshots on disk ---------------------------------------------------------------------------

def test_written_snapshot_is_found(tmp_path):
    with writing_snapshot(tmp_path, "org/name") as folder:
        (folder / "config.json").write_text("{}")
        (folder / "unet").mkdir()
        (folder / "unet" / "w.safetensors").write_bytes(b"x")
    assert folder.is_relative_to(repo_folder(tmp_path, "org/name"))
    assert find_snapshot(tmp_path, "org/name") == folder
    files = ModelFiles(tmp_path)
    assert files.has("org/name")
    assert files.folder("org/name") == folder
    assert snapshot(tmp_path, "org/name") == folder
    assert files.file("org/name", "unet/w.safetensors") == folder / "unet" / "w.safetensors"
    assert files.present([Source(repo="org/name"),
                          Source(repo="org/name", file="config.json")])


def test_half_written_snapshot_is_not_found(tmp_path):
    with writing_snapshot(tmp_path, "org/name") as folder:
        (folder / "config.json").write_text("{}")
        assert not ModelFiles(tmp_path).has("org/name")
    assert ModelFiles(tmp_path).has("org/name")


def test_single_name_repo_round_trips(tmp_path):
    with writing_snapshot(tmp_path, "solo") as folder:
        (folder / "a.txt").write_text("a")
    assert repo_folder(tmp_path, "solo").name == "models--solo"
    assert ModelFiles(tmp_path).file("solo", "a.txt").read_text() == "a"


def test_missing_repo_explains_how_to_download(tmp_path):
    files = ModelFiles(tmp_path, model_id="org/served-model")
    assert not files.has("org/missing")
    assert find_snapshot(tmp_path, "org/missing") is None
    with pytest.raises(ModelLoadError) as info:
        files.folder("org/missing")
    assert info.value.status_code == 500
    assert "download_models.py" in info.value.msg
    assert "org/served-model" in info.value.msg and "org/missing" in info.value.msg
    assert not files.present([Source(repo="org/missing")])


def test_missing_file_in_present_repo(tmp_path):
    with writing_snapshot(tmp_path, "org/name"):
        pass
    files = ModelFiles(tmp_path)
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        files.file("org/name", "nope.safetensors")
    assert not files.present([Source(repo="org/name", file="nope.safetensors")])


@pytest.mark.parametrize("repo", ["../outside", "/etc", "http://x/y"])
def test_invalid_repo_is_never_looked_up(tmp_path, repo):
    assert find_snapshot(tmp_path, repo) is None
    with pytest.raises(ModelLoadError):
        ModelFiles(tmp_path).folder(repo)


def test_pipelines_whose_libraries_are_missing_are_not_served(monkeypatch):
    import pytest

    from runner import spec as pipeline
    from runner.app import build_service
    from runner.settings import Settings

    monkeypatch.setattr(pipeline, "missing_requirements",
                        lambda m: ["diffusers"] if m.NAME == "upscale" else [])
    assert "upscale" not in pipeline.discover()
    assert "upscale" in pipeline.discover(installed_only=False)
    with pytest.raises(ValueError, match="cannot be served from this environment"):
        build_service(Settings(pipeline="upscale", tiny=True, device="cpu"))
