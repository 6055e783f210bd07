"""The runner's own cost per request, for scripts/bench.py --overhead: what a request costs
beyond the model's work, measured two ways in the same process.

- **server own**: from the request reaching the app to its last bytes handed to the
  transport (the in-process test client's own sending left out), minus the
  Server-Timing stages that are the model's work (`MODEL_STAGES`: the denoise loop, the safety
  check, ...). What is left is the runner's: routing, validation, the queue, the thread
  hand-offs, input decoding, output encoding, serialization. Both sides of the subtraction
  come from the same request, so the model's run-to-run noise cancels out.
- **over bare** (text-to-image): rounds of one request through the app, then the same call on
  the runner's own resident pipeline and safety checker in this thread (the "bare call plus
  safety check") in one of the app's worker threads, interleaved so that drift and thread
  placement hit both alike; the difference of the medians
  also catches anything the runner adds inside its own denoise stage, and includes the test
  client's in-process transport (its cost on a trivial route is reported beside it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

# Server-Timing stages that are the model's own work; every other stage, and the time outside
# the stages, is the runner's.
MODEL_STAGES = frozenset({"denoise", "safety", "transcribe", "caption", "embed", "segment",
                          "generate"})


class ServerClock:
    """ASGI wrapper: the time from a request's scope to the moment the app hands over its
    last response bytes (the transport's own sending, here the test client's, left out)."""

    def __init__(self, app: Any):
        self.app = app
        self.last_ms = 0.0

    def __getattr__(self, name: str) -> Any:  # app.state and the like, for the bench
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.last_ms = (time.perf_counter() - started) * 1000
            await send(message)

        await self.app(scope, receive, timed_send)


def model_ms(stages: dict[str, float]) -> float:
    return sum(ms for name, ms in stages.items() if name in MODEL_STAGES)


def bare_text_to_image(service: Any, call: Any) -> Callable[[], float]:
    """The request's own call on the runner's resident pipeline and safety checker, as the
    runner makes it (its defaults for what the request leaves unset), in ms."""
    import torch

    from pipelines._diffusion import generators

    entry = service.registry.resolve("text-to-image", call.json.get("model_id", ""))
    model = service.cache.resident(entry)
    checker = service.cache.resident(service.registry.safety_checker)
    values = {**entry.defaults, **{k: v for k, v in call.json.items() if v is not None},
              **entry.fixed}
    args = dict(prompt=values["prompt"], width=values["width"], height=values["height"],
                num_inference_steps=values["num_inference_steps"],
                guidance_scale=values["guidance_scale"],
                num_images_per_prompt=values.get("num_images_per_prompt", 1))

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            images = model.pipe(**args, generator=generators(model.device,
                                                               [values.get("seed", 0)])).images
        checker(images)
        return (time.perf_counter() - started) * 1000

    return bare


def measure(client: Any, clock: ServerClock, service: Any, pipeline: str, call: Any,
            rounds: int) -> dict:
    """`rounds` requests (and, for text-to-image, as many bare calls between them); medians
    in ms."""
    bare = bare_text_to_image(service, call) if pipeline == "text-to-image" else None
    http, server_own, bare_ms, health = [], [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        response = call.send(client)
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {response.text[:200]}"}
        stages = server_timing(response.headers.get("server-timing", ""))
        http.append(elapsed)
        server_own.append(clock.last_ms - model_ms(stages))
        if bare is not None:  # in the app's worker threads, where the runner's run ran too
            bare_ms.append(client.portal.call(to_thread, bare))
        started = time.perf_counter()
        client.get("/version")
        health.append((time.perf_counter() - started) * 1000)
    median = statistics.median
    result = {"rounds": rounds, "http_ms": median(http), "server_own_ms": median(server_own),
              "client_round_trip_ms": median(health)}
    if bare_ms:
        result["bare_ms"] = median(bare_ms)
        result["over_bare_ms"] = median(http) - median(bare_ms)
    return result


async def to_thread(fn: Callable[[], float]) -> float:
    import anyio

    return await anyio.to_thread.run_sync(fn)


def server_timing(header: str) -> dict[str, float]:
    """`name;dur=ms, ...` as {name: ms}."""
    return {name.strip(): float(ms) for name, ms in
            (part.split(";dur=") for part in header.split(",") if ";dur=" in part)}
