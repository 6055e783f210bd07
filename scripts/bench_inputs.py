"""Request bodies for scripts/bench.py, one sensible request per pipeline, with the media they
upload generated in memory (a noise PNG, a voiced-sounding WAV)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

PROMPT = "a photo of a cat on a sofa"
SPEECH = "The quick brown fox jumps over the lazy dog."
DESCRIPTION = ("A female speaker talks quickly in a quiet room with very clear audio.")


@dataclass
class Options:
    """What the command line sets; None takes the mode's default (see `defaults`)."""

    size: int | None = None  # image side (the input image's for image inputs)
    images: int = 1
    steps: int | None = None  # None: the model's own default from models.yaml
    audio_seconds: float | None = None
    max_tokens: int | None = None
    model: str = ""


@dataclass
class Call:
    """One HTTP request: JSON body, or multipart fields and files."""

    path: str
    json: dict | None = None
    data: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # what a naive run needs to match

    def send(self, client: Any) -> Any:
        if self.json is not None:
            return client.post(self.path, json=self.json)
        return client.post(self.path, data=self.data, files=self.files)


# Image side and audio length per mode. Tiny: the smallest the tiny models take. Real (and
# full-size) models: None = the model's own default size; otherwise what it was made for.
DEFAULTS = {
    "tiny": {"size": 64, "audio_seconds": 2.0, "max_tokens": 16},
    "real": {"size": {"text-to-image": None, "image-to-image": 512, "image-to-video": None,
                      "upscale": 256, "image-to-text": 384, "segment-anything-2": 1024},
             "audio_seconds": 60.0, "max_tokens": 128},
}


def defaults(options: Options, pipeline: str, tiny: bool) -> Options:
    """`options` with what the command line left unset filled in for the mode."""
    table = DEFAULTS["tiny" if tiny else "real"]
    size = table["size"]
    size = size.get(pipeline) if isinstance(size, dict) else size
    return Options(
        size=options.size if options.size is not None else size, images=options.images,
        steps=options.steps, model=options.model,
        audio_seconds=options.audio_seconds or table["audio_seconds"],
        max_tokens=options.max_tokens or table["max_tokens"])


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def speech_wav(seconds: float, rate: int = 16_000) -> bytes:
    """Voiced-sounding mono audio: a 140 Hz buzz with harmonics in syllable-like bursts."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    noise = np.random.default_rng(0).standard_normal(t.size)
    samples = (0.2 * voice * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) + 0.01 * noise)
    buf = io.BytesIO()
    soundfile.write(buf, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _fields(**values: Any) -> dict[str, str]:
    """Multipart fields as go-livepeer writes them: strings, unset ones left out."""
    return {k: str(v) for k, v in values.items() if v is not None and v != ""}


def _image_side(options: Options, default: tuple[int, int]) -> tuple[int, int]:
    return (options.size, options.size) if options.size else default


def request(pipeline: str, options: Options, index: int = 0) -> Call:
    """The bench's request number `index` for `pipeline`. Every request is the same except
    segment-anything-2's, whose image changes each time, so its embedding cache never hits and
    each request pays for the image encoder."""
    o = options
    steps, model = o.steps, o.model
    if pipeline == "text-to-image":
        body = {"prompt": PROMPT, "num_images_per_prompt": o.images, "seed": 1,
                "model_id": model, "width": o.size, "height": o.size,
                "num_inference_steps": steps}
        return Call("/text-to-image", json={k: v for k, v in body.items() if v is not None})
    if pipeline in ("image-to-image", "upscale"):
        side = _image_side(o, (512, 512))
        prompt = "make it snowy" if pipeline == "image-to-image" else PROMPT
        extra = {"num_images_per_prompt": o.images} if pipeline == "image-to-image" else {}
        return Call(f"/{pipeline}", data=_fields(prompt=prompt, seed=1, model_id=model,
                                                 num_inference_steps=steps, **extra),
                    files={"image": ("in.png", noise_png(*side), "image/png")},
                    params={"image_size": side})
    if pipeline == "image-to-video":
        side = _image_side(o, (1024, 576))
        sized = {"width": side[0], "height": side[1]} if o.size else {}
        return Call("/image-to-video", data=_fields(seed=1, model_id=model,
                                                    num_inference_steps=steps, **sized),
                    files={"image": ("in.png", noise_png(*side), "image/png")},
                    params={"image_size": side})
    if pipeline == "audio-to-text":
        return Call("/audio-to-text", data=_fields(model_id=model, return_timestamps="true"),
                    files={"audio": ("speech.wav", speech_wav(o.audio_seconds), "audio/wav")},
                    params={"seconds": o.audio_seconds})
    if pipeline == "image-to-text":
        side = _image_side(o, (384, 384))
        return Call("/image-to-text", data=_fields(model_id=model),
                    files={"image": ("in.png", noise_png(*side), "image/png")},
                    params={"image_size": side})
    if pipeline == "segment-anything-2":
        side = _image_side(o, (1024, 1024))
        return Call("/segment-anything-2",
                    data=_fields(model_id=model, point_coords=f"[[{side[0] // 2},{side[1] // 2}]]",
                                 point_labels="[1]"),
                    files={"image": ("in.png", noise_png(*side, seed=index), "image/png")},
                    params={"image_size": side, "seed": index})
    if pipeline == "text-to-speech":
        return Call("/text-to-speech", json={"text": SPEECH, "description": DESCRIPTION,
                                             "model_id": model})
    if pipeline == "llm":
        return Call("/llm", json={"messages": [{"role": "user", "content": "Tell me a story "
                                                "about a cat and a dog."}],
                                  "model": model, "max_tokens": o.max_tokens, "seed": 1,
                                  "temperature": 0})
    raise SystemExit(f"no bench request for pipeline {pipeline!r}")
