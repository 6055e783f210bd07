"""Helpers for the GPU suite: a request per pipeline, apps on CUDA, and what a loaded model
holds (its modules' parameters, found the way runner/footprint.py finds them)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from runner.app import create_app
from runner.settings import Settings
from tests.conftest import post_image, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_inputs  # noqa: E402  (scripts/: the benchmark's input generators)

ALL_PIPELINES = ["text-to-image", "image-to-image", "image-to-video", "upscale",
                 "audio-to-text", "image-to-text", "segment-anything-2", "llm",
                 "text-to-speech"]
# Parameters deliberately kept in float32 on CUDA, by pipeline: the x4 upscaler's VAE
# overflows in float16 (pipelines/upscale.py keeps it float32).
FLOAT32_PARTS = {"upscale": ("vae",)}


# -- inputs: the benchmark's own generators, so both send the same kind of media ------------

noise_png = bench_inputs.noise_png
wav_bytes = bench_inputs.speech_wav


def small_request(client: TestClient, pipeline: str, **fields: Any):
    """One cheap, valid request for `pipeline` (tiny models, or real ones at a small size)."""
    if pipeline == "text-to-image":
        return client.post("/text-to-image", json={"prompt": "a cat", "width": 64,
                                                   "height": 64, "seed": 1, **fields})
    if pipeline == "image-to-image":
        return post_image(client, "/image-to-image", noise_png(64, 64), prompt="make it snowy",
                          num_inference_steps=2, seed=1, **fields)
    if pipeline == "image-to-video":
        return post_image(client, "/image-to-video", noise_png(64, 64), width=64, height=64,
                          num_inference_steps=2, seed=1, **fields)
    if pipeline == "upscale":
        return post_image(client, "/upscale", noise_png(16, 16), prompt="a cat",
                          num_inference_steps=2, seed=1, **fields)
    if pipeline == "audio-to-text":
        return client.post("/audio-to-text", data={k: str(v) for k, v in fields.items()},
                           files={"audio": ("speech.wav", wav_bytes(2.0), "audio/wav")})
    if pipeline == "image-to-text":
        return post_image(client, "/image-to-text", noise_png(40, 30), **fields)
    if pipeline == "segment-anything-2":
        return post_image(client, "/segment-anything-2", noise_png(48, 32),
                          point_coords="[[10,20]]", point_labels="[1]", **fields)
    if pipeline == "llm":
        return client.post("/llm", json={"messages": [{"role": "user", "content": "Hello"}],
                                         "max_tokens": 8, **fields})
    if pipeline == "text-to-speech":
        return client.post("/text-to-speech", json={"text": "Hello there.", **fields})
    raise ValueError(pipeline)


# The top-level key each pipeline's answer must have.
ANSWER_KEY = {"text-to-image": "images", "image-to-image": "images", "image-to-video": "frames",
              "upscale": "images", "audio-to-text": "text", "image-to-text": "text",
              "segment-anything-2": "masks", "llm": "choices", "text-to-speech": "audio"}


def stages(response) -> dict[str, float]:
    """Server-Timing as {stage: ms}."""
    header = response.headers.get("server-timing", "")
    return {name.strip(): float(ms) for name, ms in
            (part.split(";dur=") for part in header.split(",") if ";dur=" in part)}


# -- apps ------------------------------------------------------------------------------------

@contextmanager
def cuda_app(pipeline: str, modules: dict | None = None, timeout: float = 300,
             **settings: Any) -> Iterator[TestClient]:
    """A started app on CUDA whose warm-up finished with /health IDLE; its models are freed
    (and the CUDA cache emptied) when the block ends."""
    values = dict(pipeline=pipeline, device="cuda", health_probe_seconds=0)
    values.update(settings)
    try:
        with TestClient(create_app(Settings(**values), modules),
                        raise_server_exceptions=False) as client:
            assert wait_ready(client, timeout) == "IDLE", "warm-up failed: /health says ERROR"
            yield client
    finally:
        release_cuda()


def release_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def resident(client: TestClient, pipeline: str, model_id: str = "") -> tuple[Any, Any]:
    """(entry, loaded model) of a resident model, through the service's public API;
    `pipeline` "safety" is the safety checker."""
    service = client.app.state.service
    entry = (service.registry.safety_checker if pipeline == "safety"
             else service.registry.resolve(pipeline, model_id))
    model = service.cache.resident(entry)
    assert model is not None, f"{entry.id} is not resident"
    return entry, model


def models(client: TestClient) -> dict[str, dict]:
    """GET /models by id (one pipeline per app here, so ids are unique)."""
    return {m["id"]: m for m in client.get("/models").json()["models"]}


# -- what a loaded model holds ---------------------------------------------------------------

def modules_of(model: Any) -> dict[str, Any]:
    """The torch modules reachable from `model` (a diffusers pipeline, a transformers pipeline,
    a dataclass holding a module...), by attribute path, outermost first, each once."""
    import torch

    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, path: str, depth: int) -> None:
        if depth > 4 or id(obj) in seen or isinstance(obj, (str, bytes, int, float)):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found[path or "model"] = obj
            return
        if isinstance(obj, dict):
            children = obj.items()
        elif isinstance(obj, (list, tuple)):
            children = enumerate(obj)
        else:
            children = getattr(obj, "__dict__", {}).items()
        for key, child in list(children):
            visit(child, f"{path}.{key}".lstrip("."), depth + 1)

    visit(model, "", 0)
    return found


def parameters(model: Any, skip: tuple[str, ...] = ()) -> list[Any]:
    """Every parameter and buffer of the model's modules, each tensor once; modules whose
    path ends in one of `skip` are left out."""
    tensors, seen = [], set()
    for path, module in modules_of(model).items():
        if path.split(".")[-1] in skip:
            continue
        for t in chain(module.parameters(), module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors.append(t)
    return tensors


def half_share(model: Any, dtype: Any, skip: tuple[str, ...] = ()) -> float:
    """The share of floating-point elements stored in `dtype`."""
    floats = [t for t in parameters(model, skip) if t.is_floating_point()]
    total = sum(t.numel() for t in floats)
    return sum(t.numel() for t in floats if t.dtype == dtype) / max(1, total)


def device_bytes(model: Any) -> int:
    """Bytes the CUDA caching allocator holds for the model's tensors: each tensor rounded up
    to the allocator's 512-byte blocks."""
    return sum(-(-t.numel() * t.element_size() // 512) * 512
               for t in parameters(model) if t.is_cuda)


def on_cpu(model: Any) -> list[str]:
    """Paths of modules that hold a parameter off the GPU."""
    return [path for path, module in modules_of(model).items()
            if any(not p.is_cuda for p in module.parameters())]


def check_estimate(pipeline: str, described: dict, model: Any, lowest: float = 0.5) -> None:
    """The cache's estimate (safetensors headers, before loading) against the bytes the loaded
    model holds (both from GET /models). Under-estimating would let the cache overfill the GPU,
    so the measured bytes may pass the estimate only by what the pipeline keeps in float32 on
    purpose; an estimate far above the truth (below `lowest`) would waste the budget."""
    name = described["id"]
    estimated, measured = described["estimated_bytes"], described["measured_bytes"]
    extra = float32_extra(model, FLOAT32_PARTS.get(pipeline, ()))
    assert measured <= estimated * 1.05 + extra + (1 << 20), (
        f"{name}: measured {measured / 2**20:.1f} MiB > estimated {estimated / 2**20:.1f} MiB "
        f"(+ {extra / 2**20:.1f} MiB kept in float32)")
    assert measured >= estimated * lowest, (
        f"{name}: estimated {estimated / 2**20:.1f} MiB, only {measured / 2**20:.1f} MiB loaded")


def float32_extra(model: Any, parts: tuple[str, ...]) -> int:
    """Bytes beyond half precision of the float32 tensors in the modules named `parts`."""
    import torch

    return sum(t.numel() * 2 for path, module in modules_of(model).items()
               if path.split(".")[-1] in parts
               for t in chain(module.parameters(), module.buffers())
               if t.dtype == torch.float32)


def files_present(model_dir: Path, entries: list) -> bool:
    from runner.hub import ModelFiles

    return all(ModelFiles(model_dir).present(e.sources()) for e in entries)

