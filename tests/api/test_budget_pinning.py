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


def test_real_pipelines_whose_default_requests_cannot_fit_are_a_start_up_error(
        app_client, make_settings, tmp_path_factory, caplog):
    """Issue 24's runner: the three tiny diffusion defaults and the checker (about 25 MiB) fit
    36 MiB, but not one default-sized request beside them. It used to report IDLE and answer
    every request 422; now each such pipeline is named with the budget it would need, before
    the port is bound (python -m runner exits 78) and, embedded, as /health ERROR."""
    pipelines = ("text-to-image", "image-to-image", "upscale")
    settings = make_settings(pipeline=",".join(pipelines), vram_budget="36MiB",
                             tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap")
    problems = create_app(settings).state.service.budget_problems()
    assert set(problems) == set(pipelines)
    for name, why in problems.items():
        needed = int(why.split("needs a budget of at least ")[1].split(" MiB")[0])
        assert needed > 36 and "this runner's is 36 MiB" in why and name in why
    client = app_client(settings, ready=False)
    assert wait_ready(client) == "ERROR"
    assert "needs a budget of at least" in caplog.text


def test_a_warm_model_bigger_than_the_whole_budget_is_a_start_up_error(app_client,
                                                                       make_settings,
                                                                       tmp_path_factory,
                                                                       caplog):
    client = app_client(make_settings(
        pipeline="text-to-image", vram_budget="2MiB",
        tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap"), ready=False)
    assert wait_ready(client) == "ERROR"
    assert "serving text-to-image (SG161222/RealVisXL_V4.0_Lightning" in caplog.text
    assert "this runner's is 2 MiB" in caplog.text


def test_before_binding_a_real_runner_names_a_pipeline_that_cannot_fit(make_settings,
                                                                      tmp_path_factory):
    """Outside tiny mode the same is found from the files' headers and configs before the
    port is bound (python -m runner then exits 78, as tests/api/test_golivepeer.py shows)."""
    settings = make_settings(pipeline="text-to-image", tiny=False, vram_budget="2MiB",
                             model_dir=tmp_path_factory.getbasetemp() / "tiny-models-swap")
    service = create_app(settings).state.service
    assert service.file_problems() == {}
    assert "this runner's is 2 MiB" in service.budget_problems()["text-to-image"]


def echo_models(folder, runs: dict[str, int], checked: bool = False):
    """The three echo pipelines, each default 600 kB and reserving `runs[name]` per run."""
    spec = {"safety_checker": {"id": "CompVis/stable-diffusion-safety-checker",
                               "kind": "clip-safety-checker"},
            "pipelines": {name: {"default": f"test/{name}", "models": [
                {"id": f"test/{name}", "kind": "echo",
                 "options": {"bytes": 600_000, "working_bytes": runs.get(name, 0)}}]}
                for name in NAMES}}
    (folder / "models.yaml").write_text(yaml.safe_dump(spec))
    return folder / "models.yaml"


@pytest.mark.parametrize("served", [NAMES, NAMES[:2], NAMES[2:]])
def test_idle_means_every_pipeline_answers_its_default_request_over_a_budget_sweep(
        app_client, make_settings, tmp_path, served):
    """The rule of issue 24 under a sweep of budgets: either the runner refuses to start,
    naming each pipeline whose default request cannot fit even alone, or it says IDLE and
    every served pipeline answers a default request (one at a time), every time."""
    runs = {"echo-one": 300_000, "echo-two": 0, "echo-three": 900_000}
    models_file = echo_models(tmp_path, runs)
    modules = {name: echo_like(name) for name in served}
    alone = {name: 600_000 + runs[name] for name in served}
    outcomes = set()
    for budget in range(500_000, 3_600_001, 350_000):
        settings = make_settings(pipeline=",".join(served), models_file=models_file,
                                 vram_budget=budget)
        refused = create_app(settings, modules).state.service.budget_problems()
        assert set(refused) == {n for n in served if alone[n] > budget}, budget
        if refused:
            outcomes.add("refused")
            continue
        client = app_client(settings, modules, ready=False)
        assert wait_ready(client) == "IDLE", budget
        outcomes.add("all pinned" if not client.get("/models").json()["on_demand"]
                     else "some on demand")
        for _ in range(2):
            for name in served:
                r = client.post(f"/{name}", files={"image": PNG})
                assert r.status_code == 200, (budget, name, r.text)
        assert client.get("/health").json() == {"status": "IDLE"}
        client.__exit__(None, None, None)
    assert outcomes >= {"refused", "all pinned"} | ({"some on demand"} if len(served) > 1
                                                    else set())


def test_real_pipelines_on_the_smallest_budget_that_serves_them_answer_default_requests(
        app_client, make_settings, tmp_path_factory):
    """Two tiny diffusion pipelines on a budget just over what the larger default-sized
    request needs alone: IDLE, not everything pinned, and each default request answered."""
    from runner import warm

    folder = tmp_path_factory.getbasetemp() / "tiny-models-swap"
    pipelines = "text-to-image,image-to-image"
    probe = create_app(make_settings(pipeline=pipelines, tiny_dir=folder)).state.service
    assert probe.budget_problems() == {}
    sizes = probe.models._estimates
    budget = max(warm.needs(d, (), sizes) for d in probe.models.demands()) + (1 << 20)
    client = app_client(make_settings(pipeline=pipelines, tiny_dir=folder,
                                      vram_budget=budget), ready=False)
    assert wait_ready(client) == "IDLE"
    state = client.get("/models").json()
    assert state["on_demand"]
    for name, default in state["default_requests"].items():
        assert default["reserved_bytes"] > 0, name
    r = client.post("/text-to-image", json={"prompt": "a cat", "num_inference_steps": 1})
    assert r.status_code == 200, r.text
    r = client.post("/image-to-image", data={"prompt": "snow", "num_inference_steps": "1"},
                    files={"image": ("a.png", png_bytes(512, 512), "image/png")})
    assert r.status_code == 200, r.text
    assert client.get("/health").json() == {"status": "IDLE"}


def test_working_memory_follows_the_model_in_hand_and_models_shows_it(tiny_dir):
    """Issue 24: a tiny 8 MiB model's 64x64 run reserved 24 MiB, the figure of a real SDXL;
    the estimate now comes from the model's own config (its channels), and /models shows the
    last run's estimate, reservation and (on the CPU: unknown) measured peak."""
    from pipelines import text_to_image
    from runner.hub import ModelFiles
    from runner.registry import Registry
    from runner.settings import Settings
    from tests.conftest import serving

    with serving("text-to-image", tiny_dir) as client:
        r = client.post("/text-to-image", json={"prompt": "a cat", "width": 64, "height": 64,
                                                "num_inference_steps": 1})
        assert r.status_code == 200, r.text
        models = client.get("/models").json()
    entry = Registry.load(Settings().models_file).default("text-to-image")
    (listed,) = [m for m in models["models"] if m["id"] == entry.id]
    tiny = listed["working_memory"]
    assert 0 < tiny["estimated_bytes"] < 8 << 20
    assert tiny["reserved_bytes"] == tiny["estimated_bytes"] and tiny["measured_bytes"] is None
    request = text_to_image.TextToImageParams(prompt="a cat", width=64, height=64)
    real = text_to_image.working_memory(entry, ModelFiles(tiny_dir / "absent", entry.id),
                                        request, 4)  # no config: the real model's widths
    assert real >= 3 * tiny["estimated_bytes"]
    assert models["default_requests"]["text-to-image"]["reserved_bytes"] > 0
