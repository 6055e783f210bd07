"""scripts/download_models.py, offline: `--check` against fake snapshot folders in the hub cache
layout, and downloads against a fake hub (huggingface_hub's functions replaced by recorders that
write what they were asked for), checked against models.yaml."""

from __future__ import annotations

import json
import re
import shlex
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from runner import checkpoints
from runner.errors import ModelLoadError
from runner.hub import ModelFiles, writing_snapshot
from runner.registry import Registry
from runner.settings import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import download_models as dm  # noqa: E402

REGISTRY = Registry.load(REPO_ROOT / "models.yaml")
SAFETY = REGISTRY.safety_checker.id


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("MODEL_DIR", "HF_TOKEN", "LLM_BACKEND", "OLLAMA_MODELS", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = dm.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


EMPTY_SAFETENSORS = struct.pack("<Q", 2) + b"{}"  # a whole file that holds no tensor


def write(model_dir: Path, repo: str, files: dict[str, str]) -> None:
    """A snapshot of `files`; a `.safetensors` name gets a whole (empty) safetensors file."""
    with writing_snapshot(model_dir, repo) as folder:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".safetensors"):
                (folder / name).write_bytes(EMPTY_SAFETENSORS)
            else:
                (folder / name).write_text(text)


# -- a fake hub: repository listings shaped like the real ones ----------------------------------

def diffusers_repo(components: dict[str, str], fp16: set[str], extra: tuple[str, ...] = ()
                   ) -> dict[str, str]:
    """A diffusers repo: model_index.json, per component its config and weights (an fp16
    variant where listed in `fp16`), plus files no loader reads (`extra`)."""
    files = {"model_index.json": json.dumps(
        {"_class_name": "Pipeline", **{c: ["diffusers", cls] for c, cls in components.items()},
         "image_encoder": [None, None], "force_zeros_for_empty_prompt": True})}
    for comp, cls in components.items():
        if cls.endswith("Scheduler"):
            files[f"{comp}/scheduler_config.json"] = "{}"
        elif cls.endswith("Tokenizer"):
            files |= {f"{comp}/vocab.json": "{}", f"{comp}/merges.txt": "",
                      f"{comp}/tokenizer_config.json": "{}"}
        elif cls.endswith("Processor"):
            files[f"{comp}/preprocessor_config.json"] = "{}"
        else:
            weights = "model" if comp.startswith("text_encoder") else "diffusion_pytorch_model"
            files |= {f"{comp}/config.json": "{}", f"{comp}/{weights}.safetensors": "w",
                      f"{comp}/{weights}.bin": "w"}
            if comp in fp16:
                files[f"{comp}/{weights}.fp16.safetensors"] = "w"
    return files | {name: "x" for name in extra}


SDXL = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection",
        "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
        "scheduler": "EulerDiscreteScheduler"}
SD = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
      "tokenizer": "CLIPTokenizer", "scheduler": "PNDMScheduler",
      "safety_checker": "StableDiffusionSafetyChecker", "feature_extractor": "CLIPImageProcessor"}
UNUSED = ("sd_xl_base_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
          "text_encoder/model.onnx", "unet/diffusion_pytorch_model.non_ema.safetensors",
          "README.md")
TRANSFORMERS = {"config.json": "{}", "generation_config.json": "{}", "tokenizer.json": "{}",
                "merges.txt": "", "model.safetensors": "w", "model.fp16.safetensors": "w",
                "pytorch_model.bin": "w", "flax_model.msgpack": "w"}
HUB: dict[str, dict[str, str]] = {
    "SG161222/RealVisXL_V4.0_Lightning": diffusers_repo(
        SDXL, fp16={"unet", "text_encoder", "text_encoder_2"}, extra=UNUSED),  # fp32-only vae
    "stabilityai/stable-diffusion-xl-base-1.0": diffusers_repo(SDXL, fp16=set(SDXL),
                                                               extra=UNUSED),
    "stabilityai/sdxl-turbo": diffusers_repo(SDXL, fp16=set(SDXL)),
    "stabilityai/sd-turbo": diffusers_repo(
        {k: v for k, v in SD.items() if k not in ("safety_checker", "feature_extractor")},
        fp16=set(SD)),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": diffusers_repo(SD, fp16=set(SD),
                                                                  extra=UNUSED),
    "ByteDance/SDXL-Lightning": {f"sdxl_lightning_{n}step_unet.safetensors": "w"
                                 for n in (1, 2, 4, 8)} | {"sdxl_lightning_4step.safetensors": "w"},
    "madebyollin/sdxl-vae-fp16-fix": {"config.json": "{}",
                                      "diffusion_pytorch_model.safetensors": "w",
                                      "sdxl.vae.safetensors": "w"},
    "CompVis/stable-diffusion-safety-checker": {"config.json": "{}", "model.safetensors": "w",
                                                "pytorch_model.bin": "w",
                                                "preprocessor_config.json": "{}"},
    **{e.main.repo: TRANSFORMERS for e in REGISTRY.entries("audio-to-text")},
}


class FakeHub:
    """Records every call; writes the requested files into the cache like the hub does."""

    def __init__(self, monkeypatch, hub: dict[str, dict[str, str]] = HUB):
        self.hub = hub
        self.snapshots: list[dict] = []
        self.files: list[dict] = []
        self.listings: list[str] = []
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", self.list_repo_files)

    def list_repo_files(self, repo_id, *, revision=None, token=None):  # patched onto HfApi
        self.listings.append(repo_id)
        return list(self.hub[repo_id])

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                          ignore_patterns=None, token=None, **kwargs):
        self.snapshots.append(dict(repo=repo_id, revision=revision, allow=allow_patterns,
                                   ignore=ignore_patterns, token=token))
        chosen = filter_repo_objects(self.hub[repo_id], allow_patterns=allow_patterns,
                                     ignore_patterns=ignore_patterns)
        write(Path(cache_dir), repo_id, {n: self.hub[repo_id][n] for n in chosen})
        return str(ModelFiles(Path(cache_dir)).folder(repo_id))

    def hf_hub_download(self, repo_id, filename, *, revision=None, cache_dir=None, token=None,
                        **kwargs):
        self.files.append(dict(repo=repo_id, file=filename, revision=revision, token=token))
        write(Path(cache_dir), repo_id, {filename: self.hub[repo_id][filename]})
        return str(ModelFiles(Path(cache_dir)).file(repo_id, filename))

    def snapshot_calls(self, repo: str) -> list[dict]:
        return [c for c in self.snapshots if c["repo"] == repo]


# -- --check (offline) ---------------------------------------------------------------------------

def test_check_lists_what_is_missing_with_the_command_that_fetches_it(tmp_path, capsys):
    rc, out = run(capsys, "--check", "--pipeline", "upscale", "--model-dir", str(tmp_path))
    assert rc == 1
    upscaler = "stabilityai/stable-diffusion-x4-upscaler"
    assert re.search(rf"MISSING\s+upscale\s+{re.escape(upscaler)}", out)
    assert re.search(rf"MISSING\s+safety\s+{re.escape(SAFETY)}", out)  # upscale checks images
    assert (f"fetch: python scripts/download_models.py --model {upscaler} "
            f"--model-dir {tmp_path}") in out
    assert (f"python scripts/download_models.py --model {upscaler} --model {SAFETY} "
            f"--model-dir {tmp_path}") in out


def test_the_printed_command_selects_exactly_the_missing_models(tmp_path, capsys):
    rc, out = run(capsys, "--check", "--pipeline", "image-to-video", "--model-dir", str(tmp_path))
    command = out.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/download_models.py"]
    args = dm.parse_args(argv[2:])
    assert args.model_dir == tmp_path
    selected = {e.id for e in dm.select(REGISTRY, args.pipeline, args.model)}
    assert selected == {e.id for e in REGISTRY.entries("image-to-video")} | {SAFETY}


def test_check_passes_when_every_file_is_there(tmp_path, capsys):
    entry = REGISTRY.default("upscale")
    write(tmp_path, entry.main.repo, diffusers_repo(
        {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
         "tokenizer": "CLIPTokenizer", "scheduler": "DDIMScheduler",
         "low_res_scheduler": "DDPMScheduler"}, fp16={"unet", "vae", "text_encoder"}))
    write(tmp_path, SAFETY, {"config.json": "{}", "model.safetensors": "w"})
    rc, out = run(capsys, "--check", "--pipeline", "upscale", "--model-dir", str(tmp_path))
    assert rc == 0, out
    assert "MISSING" not in out and "present  safety" in out


def test_a_component_without_weights_is_missing(tmp_path, capsys):
    entry = REGISTRY.default("upscale")
    files = diffusers_repo({"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                            "scheduler": "DDIMScheduler"}, fp16={"unet", "vae"})
    del files["vae/diffusion_pytorch_model.fp16.safetensors"]
    del files["vae/diffusion_pytorch_model.safetensors"]
    del files["vae/diffusion_pytorch_model.bin"]
    write(tmp_path, entry.main.repo, files)
    rc, out = run(capsys, "--check", "--model", entry.id, "--model-dir", str(tmp_path))
    assert rc == 1
    assert f"{entry.main.repo}: vae/ has no weights" in out


def test_lightning_needs_its_unet_file_but_not_the_base_unet_weights(tmp_path, capsys):
    entry = next(e for e in REGISTRY.entries("text-to-image")
                 if e.id == "ByteDance/SDXL-Lightning-4step")
    unet = entry.components["unet"]
    base = diffusers_repo(SDXL, fp16=set(SDXL))
    base = {k: v for k, v in base.items() if not (k.startswith("unet/") and "safetensors" in k
                                                  or k == "unet/diffusion_pytorch_model.bin")}
    write(tmp_path, entry.main.repo, base)
    write(tmp_path, SAFETY, {"config.json": "{}", "model.safetensors": "w"})
    rc, out = run(capsys, "--check", "--model", entry.id, "--model-dir", str(tmp_path))
    assert rc == 1
    assert f"- model files for {unet.repo} are not in" in out
    assert f"model files for {entry.main.repo} " not in out
    write(tmp_path, unet.repo, {unet.file: "w"})
    rc, out = run(capsys, "--check", "--model", entry.id, "--model-dir", str(tmp_path))
    vae = entry.components["vae"]  # the fp16-fix VAE every SDXL entry decodes with
    assert rc == 1 and f"- model files for {vae.repo} " in out
    assert f"model files for {unet.repo} " not in out
    write(tmp_path, vae.repo, {"config.json": "{}", "diffusion_pytorch_model.safetensors": "w"})
    rc, out = run(capsys, "--check", "--model", entry.id, "--model-dir", str(tmp_path))
    assert rc == 0, out


def test_allow_patterns_that_match_no_weights_are_missing(tmp_path, capsys):
    entry = REGISTRY.default("audio-to-text")
    write(tmp_path, entry.main.repo, {"config.json": "{}", "tokenizer.json": "{}"})
    rc, out = run(capsys, "--check", "--model", entry.id, "--model-dir", str(tmp_path))
    assert rc == 1
    assert f"{entry.main.repo}: no file matches model.safetensors" in out


@pytest.mark.parametrize("pipeline, safety", [("audio-to-text", False), ("image-to-text", False),
                                              ("text-to-image", True), ("image-to-video", True)])
def test_the_safety_checker_comes_with_the_pipelines_that_use_it(pipeline, safety):
    ids = {e.id for e in dm.select(REGISTRY, pipeline, None)}
    assert (SAFETY in ids) is safety


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit, match="unknown pipeline"):
        dm.select(REGISTRY, "text-to-sound", None)
    with pytest.raises(SystemExit, match="not listed"):
        dm.select(REGISTRY, "all", ["org/not-a-model"])
    assert [e.id for e in dm.select(REGISTRY, "all", [SAFETY])] == [SAFETY]


def test_downloading_needs_a_selection(tmp_path):
    with pytest.raises(SystemExit):
        dm.parse_args(["--model-dir", str(tmp_path)])


# -- downloads, against the fake hub -------------------------------------------------------------

def test_downloads_request_exactly_what_models_yaml_lists(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub = FakeHub(monkeypatch)
    rc, out = run(capsys, "--pipeline", "text-to-image,audio-to-text", "--model-dir", str(tmp_path))
    assert rc == 0, out
    entries = [*REGISTRY.entries("text-to-image"), *REGISTRY.entries("audio-to-text")]

    # sources with allow_patterns: those patterns, the bundled safety checker left out
    patterned = {s.repo: s.allow_patterns for e in entries for s in e.sources()
                 if s.allow_patterns is not None}
    for repo, patterns in patterned.items():
        (call,) = hub.snapshot_calls(repo)  # once, however many entries share it
        assert call["allow"] == patterns and call["ignore"] == ["safety_checker/*"]
    # single component files: exactly those files
    components = {(s.repo, s.file) for e in entries for s in e.components.values() if s.file}
    assert {(c["repo"], c["file"]) for c in hub.files} >= components
    # the safety checker, because text-to-image checks its images
    (call,) = hub.snapshot_calls(SAFETY)
    assert call["allow"] == REGISTRY.safety_checker.source.allow_patterns
    # every request carries the token
    assert {c["token"] for c in hub.snapshots + hub.files} == {"hf_secret"}
    # what was written is what --check wants
    rc, out = run(capsys, "--check", "--pipeline", "text-to-image,audio-to-text",
                  "--model-dir", str(tmp_path))
    assert rc == 0, out


def test_diffusers_repos_without_patterns_get_their_fp16_files(tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch)
    rc, out = run(capsys, "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "--model", "SG161222/RealVisXL_V4.0_Lightning", "--model-dir", str(tmp_path))
    assert rc == 0, out
    (sd15,) = hub.snapshot_calls("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert sorted(sd15["allow"]) == sorted([
        "model_index.json", "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"])
    # RealVisXL's VAE has no fp16 file: its plain safetensors, never .bin or other exports
    (realvis,) = hub.snapshot_calls("SG161222/RealVisXL_V4.0_Lightning")
    weights = sorted(p for p in realvis["allow"] if p.endswith((".safetensors", ".bin")))
    assert weights == ["text_encoder/model.fp16.safetensors",
                       "text_encoder_2/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    assert set(hub.listings) == {"stable-diffusion-v1-5/stable-diffusion-v1-5",
                                 "SG161222/RealVisXL_V4.0_Lightning"}


def test_complete_sources_are_not_fetched_again(tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = "ByteDance/SDXL-Lightning-4step"
    assert run(capsys, "--model", model, "--model-dir", str(tmp_path))[0] == 0
    first = len(hub.snapshots) + len(hub.files)
    rc, out = run(capsys, "--model", model, "--model-dir", str(tmp_path))
    assert rc == 0 and "present" in out
    assert len(hub.snapshots) + len(hub.files) == first


def test_a_gated_repo_is_reported_and_the_rest_still_downloads(tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch)
    real = hub.snapshot_download

    class Denied(Exception):
        response = SimpleNamespace(status_code=401)

    def gated(repo_id, **kwargs):
        if repo_id.startswith("openai/whisper-large-v3"):
            raise Denied("401 Client Error: access to this repo is restricted")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    rc, out = run(capsys, "--pipeline", "audio-to-text", "--model-dir", str(tmp_path))
    assert rc == 1
    assert "FAILED   openai/whisper-large-v3" in out and "HF_TOKEN" in out
    assert hub.snapshot_calls("openai/whisper-medium")  # the others went on


def test_offline_mode_of_the_images_does_not_stop_a_download(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    FakeHub(monkeypatch)
    assert run(capsys, "--model", SAFETY, "--model-dir", str(tmp_path))[0] == 0
    assert constants.HF_HUB_OFFLINE is False


# -- llm models through Ollama -------------------------------------------------------------------

@pytest.mark.parametrize("tag, path", [
    ("llama3.1:8b", "registry.ollama.ai/library/llama3.1/8b"),
    ("qwen2.5", "registry.ollama.ai/library/qwen2.5/latest"),
    ("someone/model:q4", "registry.ollama.ai/someone/model/q4"),
    ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo/Q4_K_M"),
])
def test_ollama_manifest_paths(tmp_path, tag, path):
    assert checkpoints.ollama_manifest(tmp_path, tag) == tmp_path / "manifests" / path


def pulled(ollama_dir: Path, tag: str, blobs: bool = True) -> None:
    manifest = checkpoints.ollama_manifest(ollama_dir, tag)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    digests = [f"sha256:{tag.replace(':', '').replace('.', '')}{i}" for i in range(2)]
    manifest.write_text(json.dumps({"config": {"digest": digests[0]},
                                    "layers": [{"digest": digests[1]}]}))
    if blobs:
        (ollama_dir / "blobs").mkdir(exist_ok=True)
        for digest in digests:
            (ollama_dir / "blobs" / digest.replace(":", "-")).write_text("b")


def test_check_reads_ollama_models_from_the_model_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_BACKEND", "ollama")  # as in the llm image
    tags = {e.id: e.options["ollama_tag"] for e in REGISTRY.entries("llm")}
    for model_id, tag in tags.items():
        pulled(tmp_path / "ollama", tag, blobs=model_id != "google/gemma-2-9b-it")
    del_tag = tags["Qwen/Qwen2.5-7B-Instruct"]
    checkpoints.ollama_manifest(tmp_path / "ollama", del_tag).unlink()
    rc, out = run(capsys, "--check", "--pipeline", "llm", "--model-dir", str(tmp_path))
    assert rc == 1
    assert re.search(r"present\s+llm\s+meta-llama/Meta-Llama-3.1-8B-Instruct \(Ollama", out)
    assert f"Ollama model {del_tag} is not in {tmp_path / 'ollama'}" in out
    assert "gemma2:9b: blob sha256:" in out
    assert (f"--model Qwen/Qwen2.5-7B-Instruct --model-dir {tmp_path} --llm-backend ollama"
            in out)
    assert SAFETY not in out


def test_llm_models_are_pulled_into_the_daemon(tmp_path, capsys, monkeypatch):
    import ollama

    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:11555")
    calls = []

    class Client:
        def __init__(self, host):
            self.host = host

        def pull(self, tag, stream=False):
            calls.append((self.host, tag, stream))
            yield SimpleNamespace(status="pulling manifest", digest=None, total=None,
                                  completed=None)
            yield SimpleNamespace(status="pulling", digest="sha256:" + "a" * 64, total=10,
                                  completed=10)
            pulled(tmp_path / "ollama", tag)

    monkeypatch.setattr(ollama, "Client", Client)
    rc, out = run(capsys, "--pipeline", "llm", "--llm-backend", "ollama",
                  "--model-dir", str(tmp_path))
    assert rc == 0, out
    assert calls == [("http://127.0.0.1:11555", e.options["ollama_tag"], True)
                     for e in REGISTRY.entries("llm")]


# -- the server's own hint -----------------------------------------------------------------------

@pytest.mark.parametrize("model_id", ["SG161222/RealVisXL_V4.0_Lightning", SAFETY,
                                      "ByteDance/SDXL-Lightning-4step"])
def test_the_servers_missing_model_error_runs_this_script(tmp_path, model_id):
    with pytest.raises(ModelLoadError) as info:
        ModelFiles(tmp_path, model_id).folder("org/absent")
    command = re.search(r"`([^`]*download_models\.py[^`]*)`", info.value.msg).group(1)
    argv = shlex.split(command)
    assert argv[1] == "scripts/download_models.py"
    args = dm.parse_args(argv[2:])
    assert model_id in {e.id for e in dm.select(REGISTRY, args.pipeline, args.model)}
