"""A test-only pipeline module: multipart with an image, Go-style floats and booleans, a JSON
array field, a blocking sleep, and holds that keep a run in flight or a model loading until the
test lets them go (`held()`), whatever the machine's speed. It goes through the same route
generation, cache and executor as the real pipelines, which is what the API tests need to
see."""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from runner.context import RunContext
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.media import decode_image
from runner.options import Options as BaseOptions
from runner.protocol import Upload
from runner.registry import ModelEntry

NAME = "echo-image"


class Options(BaseOptions):
    bytes: int = Field(4096, ge=4, description="Size of the random weights written.")
    load_seconds: float = Field(0.0, ge=0, description="How long a load sleeps.")
    fail_load: bool = Field(False, description="Loading raises, as a broken checkpoint would.")
    working_bytes: int = Field(0, ge=0, description="The working memory each run reserves.")


STOPPED: list[str] = []  # models whose run saw its client go away


class Hold(enum.Enum):
    RUN = "run"  # runs sent with hold=true
    LOAD = "load"  # every model load


_gates: dict[Hold, threading.Event] = {}  # the open `held()` blocks' gates


@contextmanager
def held(what: Hold = Hold.RUN) -> Iterator[None]:
    """While the block runs, what it holds waits (blocking, as `sleep` does; a run stops once
    its client has gone) and goes on when it ends. Outside such a block nothing waits."""
    gate = _gates[what] = threading.Event()
    try:
        yield
    finally:
        del _gates[what]
        gate.set()


class EchoParams(BaseModel):
    image: Upload = Field(description="Any image.")
    model_id: str = ""
    strength: float = Field(0.8, ge=0, le=1)
    flag: bool = False
    points: str = Field("", description="A JSON array, as go-livepeer sends it.")
    sleep: float = Field(0.0, ge=0, le=30)
    hold: bool = Field(False, description="Wait while the test's `held()` block runs.")
    fail: bool = Field(False, description="Raise an unexpected error inside run().")
    seed: int | None = None
    size: int | None = None


class EchoResponse(BaseModel):
    width: int
    height: int
    strength: float
    flag: bool
    points: list
    seed: int | None
    size: int | None
    model: str


Request = EchoParams
Response = EchoResponse


def load(entry: ModelEntry, files: ModelFiles, device) -> dict:
    from safetensors.torch import load_file

    folder = files.folder(entry.main.repo)
    time.sleep(Options.of(entry).load_seconds)
    if (gate := _gates.get(Hold.LOAD)) is not None:
        gate.wait()
    if Options.of(entry).fail_load:
        raise RuntimeError("this checkpoint is broken on purpose")
    return {"id": entry.id, "weights": load_file(folder / "model.safetensors")}


def run(model: dict, request: EchoParams, ctx: RunContext) -> EchoResponse:
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    try:
        points = json.loads(request.points) if request.points else []
    except json.JSONDecodeError as exc:
        raise BadRequest(f"points is not valid JSON: {exc.msg}") from exc
    if request.fail:
        raise RuntimeError("unexpected failure inside the model")
    if request.sleep:
        # Blocking on purpose (it must never stall the event loop), in steps that stop once
        # the client has gone, as the diffusion pipelines do between denoising steps.
        deadline = time.monotonic() + request.sleep
        while time.monotonic() < deadline:
            ctx.cancelled.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            stop_if_gone(model, ctx)
    if request.hold and (gate := _gates.get(Hold.RUN)) is not None:
        while not gate.wait(0.05):
            stop_if_gone(model, ctx)
    return EchoResponse(width=image.width, height=image.height, strength=request.strength,
                        flag=request.flag, points=points, seed=request.seed, size=request.size,
                        model=model["id"])


def working_memory(entry: ModelEntry, files: ModelFiles, request: EchoParams,
                   float_bytes: int) -> int:
    return Options.of(entry).working_bytes


def stop_if_gone(model: dict, ctx: RunContext) -> None:
    """A step of a blocking wait: stop (recorded in STOPPED) once the client has gone."""
    if ctx.cancelled.is_set():
        STOPPED.append(model["id"])
    ctx.check_cancelled()


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    numel = Options.of(entry).bytes // 4
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        save_file({"w": torch.zeros(numel)}, folder / "model.safetensors")
