"""models.yaml validation, model resolution, and request defaults from the registry."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines import text_to_image
from runner.errors import FieldError
from runner.registry import ModelEntry, ModelsFile, Registry, Source
from runner.spec import check_defaults, read, with_defaults

MODELS_YAML = Path(__file__).resolve().parents[2] / "models.yaml"

SPEC = {
    "safety_checker": {"id": "CompVis/stable-diffusion-safety-checker",
                       "kind": "clip-safety-checker"},
    "pipelines": {
        "text-to-image": {
            "default": "org/a",
            "models": [
                {"id": "org/a", "kind": "sd", "defaults": {"num_inference_steps": 4}},
                {"id": "org/b", "kind": "sdxl", "fixed": {"guidance_scale": 0.0}},
            ],
        },
        "upscale": {"default": "org/u", "models": [{"id": "org/u", "kind": "x"}]},
    },
}


def spec(**changes) -> dict:
    value = copy.deepcopy(SPEC)
    value.update(changes)
    return value


def registry(defaults: dict[str, str] | None = None) -> Registry:
    return Registry(ModelsFile.model_validate(spec()), defaults)


# -- validation ----------------------------------------------------------------------------------

def test_valid_spec_loads():
    reg = registry()
    assert reg.pipelines == ["text-to-image", "upscale"]
    assert [e.id for e in reg.entries("text-to-image")] == ["org/a", "org/b"]
    assert all(e.pipeline == "text-to-image" for e in reg.entries("text-to-image"))
    assert reg.safety_checker.pipeline == "safety"


@pytest.mark.parametrize("where", ["top", "pipeline", "entry", "source"])
def test_unknown_keys_are_rejected(where):
    value = spec()
    group = value["pipelines"]["text-to-image"]
    if where == "top":
        value["extra"] = 1
    elif where == "pipeline":
        group["defualt"] = "org/a"
    elif where == "entry":
        group["models"][0]["dtpye"] = "float16"
    else:
        group["models"][0]["source"] = {"repo": "org/a", "revsion": "main"}
    with pytest.raises(ValidationError, match="xtra|not permitted"):
        ModelsFile.model_validate(value)


def test_default_must_be_listed():
    value = spec()
    value["pipelines"]["text-to-image"]["default"] = "org/missing"
    with pytest.raises(ValidationError, match="org/missing"):
        ModelsFile.model_validate(value)


def test_duplicate_ids_are_rejected():
    value = spec()
    models = value["pipelines"]["text-to-image"]["models"]
    models.append({"id": "org/a", "kind": "sdxl"})
    with pytest.raises(ValidationError, match="unique"):
        ModelsFile.model_validate(value)


def test_same_id_in_two_pipelines_is_allowed():
    value = spec()
    value["pipelines"]["upscale"]["models"].append({"id": "org/a", "kind": "x"})
    reg = Registry(ModelsFile.model_validate(value))
    assert reg.resolve("upscale", "org/a").pipeline == "upscale"
    assert reg.resolve("text-to-image", "org/a").pipeline == "text-to-image"


def test_bad_dtype_and_concurrency_are_rejected():
    with pytest.raises(ValidationError):
        ModelEntry(id="org/a", kind="sd", dtype="float8")
    with pytest.raises(ValidationError):
        ModelEntry(id="org/a", kind="sd", max_concurrency=0)


@pytest.mark.parametrize("repo", [
    "../etc", "org/../../etc", "org/..", "/abs/path", "/abs", "http://host/x",
    "https://huggingface.co/org/name", "a/b/c", "", "org/", "/name", "~/models", "org\\name",
])
def test_invalid_repo_ids_are_rejected(repo):
    with pytest.raises(ValidationError, match="not a hub repository id"):
        Source(repo=repo)


def test_invalid_repo_in_models_file_is_rejected():
    value = spec()
    value["pipelines"]["text-to-image"]["models"][0]["source"] = {"repo": "../../outside"}
    with pytest.raises(ValidationError):
        ModelsFile.model_validate(value)


@pytest.mark.parametrize("repo", ["org/name", "name", "org/name-v1.5", "Org_1/model.x"])
def test_valid_repo_ids_are_accepted(repo):
    assert Source(repo=repo).repo == repo


def test_main_source_defaults_to_the_id():
    entry = ModelEntry(id="org/a", kind="sd")
    assert entry.main == Source(repo="org/a")
    other = ModelEntry(id="org/a", kind="sd", source={"repo": "org/base"},
                       components={"unet": {"repo": "org/unet", "file": "u.safetensors"}})
    assert [s.repo for s in other.sources()] == ["org/base", "org/unet"]


# -- resolution ----------------------------------------------------------------------------------

def test_empty_model_id_resolves_to_default():
    reg = registry()
    assert reg.resolve("text-to-image", "").id == "org/a"
    assert reg.default("text-to-image").id == "org/a"
    assert reg.resolve("text-to-image", "org/b").id == "org/b"


def test_unknown_model_id_is_a_422_on_model_id():
    with pytest.raises(FieldError) as info:
        registry().resolve("text-to-image", "org/nope")
    assert info.value.status_code == 422
    assert info.value.field == "model_id"
    assert "org/nope" in info.value.msg
    assert "org/a" in info.value.msg and "org/b" in info.value.msg


def test_model_id_override_changes_the_default():
    reg = registry({"text-to-image": "org/b"})
    assert reg.resolve("text-to-image", "").id == "org/b"
    assert reg.default("upscale").id == "org/u"  # other pipelines keep theirs
    assert registry({"text-to-image": ""}).default("text-to-image").id == "org/a"


def test_model_id_override_must_be_listed():
    with pytest.raises(FieldError):
        registry({"text-to-image": "org/nope"})


# -- the real models.yaml ------------------------------------------------------------------------

def test_real_models_yaml_loads_and_defaults_fit_the_request():
    reg = Registry.load(MODELS_YAML)
    assert "text-to-image" in reg.pipelines
    entries = reg.entries("text-to-image")
    assert entries and reg.default("text-to-image") in entries
    check_defaults(reg, {text_to_image.NAME: read(text_to_image)})
    for entry in entries:
        request = with_defaults(text_to_image.Request(prompt="a cat"), entry)
        text_to_image.Request.model_validate(request.model_dump())
        for source in entry.sources():
            assert Source.model_validate(source.model_dump()) == source
    assert reg.safety_checker.id == "CompVis/stable-diffusion-safety-checker"


def test_check_defaults_rejects_unknown_field_and_bad_value():
    bad_field = spec()
    bad_field["pipelines"]["text-to-image"]["models"][0]["defaults"] = {"steps": 4}
    reg = Registry(ModelsFile.model_validate(bad_field))
    modules = {text_to_image.NAME: read(text_to_image)}
    with pytest.raises(ValueError, match="steps"):
        check_defaults(reg, modules)
    bad_value = spec()
    bad_value["pipelines"]["text-to-image"]["models"][1]["fixed"] = {"guidance_scale": "high"}
    with pytest.raises(ValidationError):
        check_defaults(Registry(ModelsFile.model_validate(bad_value)), modules)


def test_with_defaults_fills_only_unset_fields_and_fixed_wins():
    entry = ModelEntry(id="org/a", kind="sd",
                       defaults={"width": 512, "height": 512, "num_inference_steps": 30},
                       fixed={"guidance_scale": 0.0})
    sent = text_to_image.Request(prompt="a cat", width=768, guidance_scale=7.5)
    out = with_defaults(sent, entry)
    assert out.width == 768  # sent: kept
    assert out.height == 512 and out.num_inference_steps == 30  # unset: the model's defaults
    assert out.guidance_scale == 0.0  # fixed: replaces what was sent
    assert out.prompt == "a cat"
    assert sent.height is None and sent.guidance_scale == 7.5  # the original is not mutated


def test_with_defaults_without_model_values_returns_the_request():
    sent = text_to_image.Request(prompt="a cat")
    assert with_defaults(sent, ModelEntry(id="org/a", kind="sd")) is sent
