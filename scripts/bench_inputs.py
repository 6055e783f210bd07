"""Request bodies for scripts/bench.py: each pipeline's own sample request (runner/sample.py),
with the media it uploads generated in memory (a noise PNG, a voiced-sounding WAV)."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import Any

from runner.sample import NoiseImage, Sample, Scale, Speech
from runner.spec import PipelineSpec, discover, read


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


def sample(pipeline: str, options: Options, index: int = 0) -> Sample:
    """The pipeline's own sample request (its `sample_request` hook) at the command line's
    sizes: fields and the uploads it describes, none of them made yet."""
    spec = spec_of(pipeline)
    if spec.sample_request is None:
        raise SystemExit(f"pipeline {pipeline!r} has no sample request to bench")
    return spec.sample_request(Scale(
        size=options.size, images=options.images, steps=options.steps,
        audio_seconds=options.audio_seconds or 2.0, max_tokens=options.max_tokens or 16,
        model=options.model, index=index))


def request(pipeline: str, options: Options, index: int = 0) -> Call:
    """The bench's request number `index` for `pipeline`: its sample, as HTTP."""
    spec, wanted = spec_of(pipeline), sample(pipeline, options, index)
    path = f"/{spec.name}"
    if not spec.multipart:
        return Call(path, json={k: v for k, v in wanted.fields.items() if v is not None},
                    params=wanted.params)
    return Call(path, data=_fields(**wanted.fields), params=wanted.params,
                files={name: _upload(name, upload) for name, upload in wanted.uploads.items()})


def _upload(name: str, upload: NoiseImage | Speech) -> tuple[str, bytes, str]:
    if isinstance(upload, Speech):
        return f"{name}.wav", speech_wav(upload.seconds), "audio/wav"
    return f"{name}.png", noise_png(upload.width, upload.height, upload.seed), "image/png"


@functools.cache
def spec_of(pipeline: str) -> PipelineSpec:
    """The pipeline's spec, read once per process."""
    modules = discover(installed_only=False)
    if pipeline not in modules:
        raise SystemExit(f"no bench request for pipeline {pipeline!r}")
    return read(modules[pipeline])
