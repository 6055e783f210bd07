"""A pipeline's sample request, for the benchmarks: each pipeline's `sample_request(scale)`
says what a sensible request looks like at a given size; scripts/bench_inputs.py turns it into
HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
