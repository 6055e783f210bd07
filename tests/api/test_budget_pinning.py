"""Several pipelines in one process under a budget that cannot hold all their warm models:
the runner reports ready, says which warm models it loads on demand, and serves every pipeline
by swapping; a warm model bigger than the whole budget is a clear start-up error."""

from __future__ import annotations

import types

import pytest
import yaml

from runner.app import create_app
from tests.conftest import png_bytes, wait_ready
from tests.support import echo_pipeline

PNG = ("a.png", png_bytes(), "image/png")
NAMES = ("echo-one", "echo-two", "echo-three")


def echo_like(name: str) -> types.ModuleType:
    """The echo test pipeline under another route and models.yaml key."""
    module = types.ModuleType(f"echo_{name.replace('-', '_')}")
    module.__dict__.update({k: v for k, v in vars(echo_pipeline).items()
                            if not k.startswith("__")})
    module.__doc__, module.NAME = echo_pipeline.__doc__, name
    return module


@pytest.fixture(scope="module")
def three_pipelines(tmp_path_factory):
    """Three pipelines whose defaults hold 600 kB each (and need no working memory)."""
    folder = tmp_path_factory.mktemp("three-pipelines")
    spec = {"safety_checker": {"id": "CompVis/stable-diffusion-safety-checker",
                               "kind": "clip-safety-checker"},
            "pipelines": {name: {"default": f"test/{name}", "models": [
                {"id": f"test/{name}", "kind": "echo", "options": {"bytes": 600_000}}]}
                for name in NAMES}}
    (folder / "models.yaml").write_text(yaml.safe_dump(spec))
    return folder / "models.yaml", {name: echo_like(name) for name in NAMES}


def test_every_pipeline_is_served_by_swapping_under_a_small_budget(app_client, make_settings,
                                                                  three_pipelines):
    models_file, modules = three_pipelines
    # 1.5 MB: the first default pinned leaves room for one more at a time.
    client = app_client(make_settings(pipeline=",".join(NAMES), models_file=models_file,
                                      vram_budget=1_500_000), modules, ready=False)
    assert wait_ready(client) == "IDLE"
    state = client.get("/models").json()
    assert state["on_demand"] == ["test/echo-two", "test/echo-three"]
    for _ in range(2):
        for name in NAMES:
            r = client.post(f"/{name}", files={"image": PNG})
            assert r.status_code == 200 and r.json()["model"] == f"test/{name}", r.text
            state = client.get("/models").json()
            assert state["resident_bytes"] <= state["budget_bytes"]
    by_id = {m["id"]: m for m in state["models"]}
    assert by_id["test/echo-one"]["pinned"] and by_id["test/echo-one"]["tier"] == "device"
    assert client.get("/health").json() == {"status": "IDLE"}


def test_real_pipelines_under_a_budget_below_their_defaults_report_ready(app_client,
                                                                        make_settings,
                                                                        tmp_path_factory):
    """The three tiny diffusion defaults (about 8 MiB each) under 12 MiB: ready, each loaded
    on demand. A request is then answered by what fits: in tiny mode the working-memory
    estimates, sized for the real models, leave no room for a run (422 naming the model)."""
    client = app_client(make_settings(
        pipeline="text-to-image,image-to-image,upscale", vram_budget="12MiB",
        tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap"), ready=False)
    assert wait_ready(client) == "IDLE"
    assert {"SG161222/RealVisXL_V4.0_Lightning", "timbrooks/instruct-pix2pix",
            "stabilityai/stable-diffusion-x4-upscaler"} <= set(
        client.get("/models").json()["on_demand"])
    r = client.post("/text-to-image", json={"prompt": "a cat", "width": 64, "height": 64})
    assert r.status_code == 422 and "working memory" in r.json()["detail"][0]["msg"], r.text


def test_a_warm_model_bigger_than_the_whole_budget_is_a_start_up_error(app_client,
                                                                       make_settings,
                                                                       tmp_path_factory,
                                                                       caplog):
    client = app_client(make_settings(
        pipeline="text-to-image", vram_budget="2MiB",
        tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap"), ready=False)
    assert wait_ready(client) == "ERROR"
    assert "SG161222/RealVisXL_V4.0_Lightning needs about" in caplog.text
    assert "more than this runner's whole budget of 2 MiB" in caplog.text


def test_before_binding_a_real_runner_names_a_model_that_cannot_fit(make_settings,
                                                                   tmp_path_factory):
    """Outside tiny mode the same is found from the files' headers before the port is bound
    (python -m runner then exits 78, as tests/api/test_golivepeer.py shows for missing files)."""
    settings = make_settings(pipeline="text-to-image", tiny=False, vram_budget="2MiB",
                             model_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap")
    problems = create_app(settings).state.service.file_problems()
    assert "more than this runner's whole budget of 2 MiB" in " ".join(
        problems["SG161222/RealVisXL_V4.0_Lightning"])
