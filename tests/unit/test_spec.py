"""runner/spec.py: a pipeline module read once into a typed spec, its hooks checked when it is
discovered, its models' options checked at start."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel

from runner.app import build_service
from runner.options import Options
from runner.registry import ModelsFile, Registry
from runner.sample import Scale
from runner.settings import Settings
from runner.spec import DECODED_ERRORS, check_defaults, discover, read, reference


class Ask(BaseModel):
    prompt: str = ""


class Answer(BaseModel):
    text: str = ""


def module(**names: object) -> types.ModuleType:
    """A pipeline module with the required names, then `names` over them."""
    m = types.ModuleType("pipelines.fake")
    m.NAME, m.Request, m.Response = "fake", Ask, Answer
    m.load = lambda entry, files, device: object()
    m.run = lambda model, request, ctx: Answer()
    m.build_tiny = lambda entry, model_dir: None
    for key, value in names.items():
        setattr(m, key, value)
    return m


def test_optional_names_take_their_defaults_in_one_place():
    spec = read(module())
    assert spec.error_statuses == DECODED_ERRORS and spec.billed_defaults == {}
    assert spec.operation_id == "genFake" and spec.summary == "Fake"
    assert spec.stream is None and spec.working_memory is None and spec.hooks.warm_up is None
    assert spec.hooks.options is Options and not spec.run_is_async and not spec.openai_chat


@pytest.mark.parametrize("names, expected", [
    ({"run": lambda model, request: None}, "run must take 3 arguments"),
    ({"working_memory": lambda entry: 0}, "working_memory must take 4 arguments"),
    ({"health": lambda model: True}, "health must be a coroutine function"),
    ({"stream": lambda model, request, ctx: iter(())}, "stream must be an async generator"),
    ({"move": "to the GPU"}, "move must be a function"),
    ({"Options": dict}, "Options must subclass runner.options.Options"),
])
def test_a_hook_of_the_wrong_shape_is_refused_at_discovery(names, expected):
    with pytest.raises(TypeError, match=expected):
        read(module(**names))


def test_a_missing_required_name_is_refused():
    m = module()
    del m.build_tiny
    with pytest.raises(TypeError, match="lacks build_tiny"):
        read(m)


def fake_registry(options: dict) -> Registry:
    return Registry(ModelsFile.model_validate({
        "safety_checker": {"id": "org/checker", "kind": "safety"},
        "pipelines": {"fake": {"default": "org/a", "models": [
            {"id": "org/a", "kind": "fake", "options": options}]}}}))


class FakeOptions(Options):
    max_pixels: int = 1024


def test_a_misspelt_option_stops_the_start_naming_model_and_key():
    specs = {"fake": read(module(Options=FakeOptions))}
    check_defaults(fake_registry({"max_pixels": 64}), specs)
    with pytest.raises(ValueError, match="org/a options: max_pixles: Extra inputs"):
        check_defaults(fake_registry({"max_pixles": 64}), specs)
    with pytest.raises(ValueError, match="org/a options: max_pixels: Input should be"):
        check_defaults(fake_registry({"max_pixels": "big"}), specs)


def test_a_pipeline_without_options_takes_none():
    with pytest.raises(ValueError, match="org/a options: anything"):
        check_defaults(fake_registry({"anything": 1}), {"fake": read(module())})


def test_the_real_models_yaml_options_are_all_ones_their_pipelines_read(tmp_path):
    service = build_service(Settings(tiny=True, device="cpu", tiny_dir=tmp_path))
    assert service.specs  # build_service ran check_defaults over every served pipeline


@pytest.mark.parametrize("name", sorted(discover(installed_only=False)))
def test_every_pipeline_has_a_sample_request_its_route_accepts(name):
    spec = read(discover(installed_only=False)[name])
    assert spec.sample_request is not None, f"{name} has no sample_request for the benchmarks"
    sample = spec.sample_request(Scale(size=64))
    fields = {k: v for k, v in sample.fields.items() if v is not None}
    assert set(fields) | set(sample.uploads) <= set(spec.request.model_fields)
    if not spec.multipart:
        spec.request.model_validate(fields)


def test_reference_lists_every_name_the_spec_reads():
    table = reference()
    for name in ("NAME", "Request", "load", "run", "Options", "working_memory", "health",
                 "sample_request", "ERROR_STATUSES", "OPENAI_CHAT"):
        assert f"| `{name}` |" in table
