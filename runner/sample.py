"""A pipeline's sample request: each pipeline's `sample_request(scale)` says what a sensible
request looks like at a given size. scripts/bench_inputs.py turns it into HTTP for the
benchmarks; at the default scale it is the default-sized request the warm plan reserves for."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile


@dataclass(frozen=True)
class Scale:
    """How big a sample request is; None leaves the model's (or the pipeline's) default."""

    size: int | None = None  # image side (the input image's for image inputs)
    images: int = 1
    steps: int | None = None
    audio_seconds: float = 2.0
    max_tokens: int = 16
    model: str = ""
    index: int = 0  # which request of a run: a pipeline may vary its input with it


@dataclass(frozen=True)
class NoiseImage:
    """An uploaded image of random pixels."""

    width: int
    height: int
    seed: int = 0


@dataclass(frozen=True)
class Speech:
    """An uploaded WAV of voiced-sounding audio."""

    seconds: float


@dataclass(frozen=True)
class Sample:
    """Request fields (unset ones None), uploads by field, and what a naive run needs to match
    it (`params`)."""

    fields: dict[str, Any]
    uploads: dict[str, NoiseImage | Speech] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def default_request(request: type[BaseModel], sample: Sample | None,
                    values: dict[str, Any]) -> BaseModel:
    """A default-sized request, for estimating what it needs before any arrives:
    the pipeline's sample at the default scale (None: no sample), its uploads as files of their
    size (an image's header is what estimates read), under `values` (the model's defaults)."""
    fields = {k: v for k, v in (sample.fields if sample else {}).items()
              if v is not None and k != "model_id"}
    uploads = {name: _file(upload) for name, upload in (sample.uploads if sample else {}).items()}
    merged = {**fields, **uploads, **values}
    try:
        return request.model_validate(merged)
    except ValidationError:  # a sample short of a required field: what it has, unvalidated
        return request.model_construct(**merged)


def _file(upload: NoiseImage | Speech) -> UploadFile:
    data = io.BytesIO()
    if isinstance(upload, NoiseImage):
        from PIL import Image

        Image.new("RGB", (upload.width, upload.height)).save(data, format="PNG")
        data.seek(0)
    return UploadFile(data, filename="sample")
