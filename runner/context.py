"""What a pipeline's run() gets besides its model and request: the entry it serves, the
device, its files, the settings, the safety checker when asked for, and the stage timer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from runner import media, safety
from runner.device import Device
from runner.errors import ClientClosed
from runner.hub import ModelFiles
from runner.registry import ModelEntry
from runner.settings import Settings


@dataclass
class RunContext:
    """What a pipeline's run() gets besides its model and request."""

    entry: ModelEntry
    device: Device
    files: ModelFiles
    settings: Settings
    checker: safety.SafetyChecker | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        """Called by pipelines between steps: stops the run once its client has gone."""
        if self.cancelled.is_set():
            raise ClientClosed("the client closed the connection; the run was stopped")

    def step_callback(self, pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        """diffusers' `callback_on_step_end`: a cancelled run ends at its next step."""
        self.check_cancelled()
        return tensors

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a step of run(); the times go out in the Server-Timing header."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def encode_png(self, image: Image.Image) -> str:
        return media.png_data_url(image, self.settings.png_compress_level)

    def check_safety(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Flags per image and the images after SAFETY_POLICY; no-op when the request did not
        ask for a safety check."""
        if self.checker is None or not images:
            return images, [False] * len(images)
        with self.stage("safety"):
            flags = self.checker(images)
        return safety.apply_policy(images, flags, self.settings.safety_policy), flags
