"""Real checkpoints on CUDA, for every pipeline whose default model (and the safety checker,
where the pipeline checks images) is in MODEL_DIR (default /models); skipped otherwise. One
small request each, the serving dtype, and the cache's estimate against the loaded bytes."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from runner.registry import Registry
from runner.settings import Settings
from runner.spec import discover
from tests.conftest import post_image
from tests.gpu.conftest import HAS_PARLER, NO_PARLER
from tests.gpu.support import (
    ALL_PIPELINES,
    ANSWER_KEY,
    FLOAT32_PARTS,
    check_estimate,
    cuda_app,
    files_present,
    half_share,
    models,
    noise_png,
    on_cpu,
    resident,
    wav_bytes,
)

pytestmark = pytest.mark.gpu
MODEL_DIR = Path(os.environ.get("MODEL_DIR", "/models"))
SERVED = discover()
REGISTRY = Registry.load(Settings().models_file)


def real_request(client, pipeline: str):
    """A request at a size the real model is made for, with few steps."""
    if pipeline == "text-to-image":  # the model's own size and steps (1024x1024, 5 steps)
        return client.post("/text-to-image", json={"prompt": "a cat on a sofa", "seed": 1})
    if pipeline == "image-to-image":
        return post_image(client, "/image-to-image", noise_png(512, 512),
                          prompt="make it snowy", num_inference_steps=4, seed=1)
    if pipeline == "image-to-video":
        return post_image(client, "/image-to-video", noise_png(512, 288), width=512,
                          height=288, num_inference_steps=4, seed=1)
    if pipeline == "upscale":
        return post_image(client, "/upscale", noise_png(128, 128), prompt="a cat",
                          num_inference_steps=10, seed=1)
    if pipeline == "audio-to-text":
        return client.post("/audio-to-text",
                           files={"audio": ("speech.wav", wav_bytes(10.0), "audio/wav")})
    if pipeline == "image-to-text":
        return post_image(client, "/image-to-text", noise_png(384, 384))
    if pipeline == "segment-anything-2":
        return post_image(client, "/segment-anything-2", noise_png(640, 480),
                          point_coords="[[320,240]]", point_labels="[1]")
    if pipeline == "llm":
        return client.post("/llm", json={"messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 16})
    if pipeline == "text-to-speech":
        return client.post("/text-to-speech", json={"text": "Hello there, how are you?"})
    raise ValueError(pipeline)


def needed(pipeline: str) -> list:
    module = SERVED[pipeline]
    entries = [REGISTRY.default(pipeline)]
    if "safety_check" in module.Request.model_fields:
        entries.append(REGISTRY.safety_checker)
    return entries


@pytest.mark.parametrize("pipeline", ALL_PIPELINES)
def test_real_default_model_on_cuda(pipeline):
    import torch

    if pipeline == "text-to-speech" and not HAS_PARLER:
        pytest.skip(NO_PARLER)
    if pipeline not in SERVED:
        pytest.skip(f"{pipeline} cannot be served from this environment")
    if not files_present(MODEL_DIR, needed(pipeline)):
        pytest.skip(f"{', '.join(e.id for e in needed(pipeline))} not (all) in {MODEL_DIR}; "
                    f"python scripts/download_models.py --pipeline {pipeline}")
    with cuda_app(pipeline, tiny=False, model_dir=MODEL_DIR, timeout=900) as client:
        entry, model = resident(client, pipeline)
        assert on_cpu(model) == [], f"parameters left off the GPU in {on_cpu(model)}"
        if type(model).__name__ != "OfficialSam2":  # the sam2 package runs float32 weights
            dtype = getattr(torch, entry.dtype)
            assert half_share(model, dtype, FLOAT32_PARTS.get(pipeline, ())) >= 0.95

        r = real_request(client, pipeline)
        assert r.status_code == 200, r.text
        body = r.json()
        assert ANSWER_KEY[pipeline] in body
        if pipeline == "text-to-image":
            url = body["images"][0]["url"]
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert image.size == (1024, 1024)
        for name, info in models(client).items():
            _, loaded = resident(client, info["pipeline"], name)
            check_estimate(info["pipeline"], info, loaded)
