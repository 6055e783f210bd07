"""Test-only helpers that used to be methods or functions of product modules: the product
never calls them, so they live here, each taking the product object as its first argument."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from runner.cache import ModelCache
from runner.executor import Executor, Lane
from runner.registry import ModelEntry

T = TypeVar("T")

# -- time limits -------------------------------------------------------------------------------
# The suite runs beside other work (a loaded CI box, other test runs), where anything can take
# many times what it takes on a quiet machine. A test waits for the event it needs; a limit on
# that wait only ends a hang, so it is SLOW_MACHINE times the quiet time or more. A test asserts
# what happened, not how fast: a duration is asserted only where it is the behaviour under test,
# with a margin of the same order.

SLOW_MACHINE = 20
"""How many times slower than a quiet 2-core machine a busy one may be."""

HANG_S = 60.0
"""The limit on a wait for what takes at most a few seconds on a quiet machine."""


def patient(quiet_s: float) -> float:
    """The limit on a wait for what takes `quiet_s` seconds on a quiet machine."""
    return max(HANG_S, SLOW_MACHINE * quiet_s)


def wait_until(check: Callable[[], T], what: str, limit: float = HANG_S,
               step: float = 0.02) -> T:
    """`check()`'s first truthy answer, polled every `step` s; AssertionError naming `what`
    once `limit` s have passed (checked once more after the limit, so a starved thread that
    wakes late still sees the event)."""
    deadline = time.monotonic() + limit
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {limit:g} s waiting for {what}")
        time.sleep(step)
    return found


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decode_data_url(url: str) -> tuple[str, bytes]:
    """The mime type and bytes of a base64 data URL (what runner.media.data_url writes)."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError("not a base64 data URL")
    return header[5:-7], base64.b64decode(payload)


def is_ready(cache: ModelCache, entry: ModelEntry) -> bool:
    """Whether `entry`'s model is on the device and not moving: servable without a wait."""
    slot = cache._slots.get(cache.key(entry))
    return slot is not None and slot.tier == "device" and slot.moving is None


async def run_in_lane(executor: Executor, lane: Lane, fn: Callable[..., T], *args: Any,
                      on_oom: Callable[[], Awaitable[Any] | Any] | None = None,
                      deadline: float | None = None) -> T:
    """`fn` in a worker thread on its lane's turn, with the executor's OOM retry and error
    mapping (what the service does in steps, with its memory accounting between them)."""
    async with executor.turn(lane, deadline):
        return await executor.call(fn, *args, on_oom=on_oom)


def daemon_vram(backend: Any) -> int:
    """Bytes of VRAM an llm OllamaBackend's daemon holds for all its models: memory the cache
    does not own. Sync: the backend's load-time client."""
    return sum(int(m.size_vram or 0) for m in backend.sync.ps().models)


def write_tiny_lora(pipe: Any, folder: Path, rank: int = 4) -> None:
    """A random LoRA for `pipe`'s UNet in the layout of hub LoRA repos."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.unet.add_adapter(config, adapter_name="tiny")
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="tiny")
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers)
    pipe.unet.delete_adapters("tiny")


@contextmanager
def hook_replaced(spec: Any, name: str, fn: Any) -> Iterator[None]:
    """Swap one hook of a served pipeline's spec (read once at start, frozen) for a spy, and
    put the real one back after."""
    real = getattr(spec, name)
    object.__setattr__(spec, name, fn)
    try:
        yield
    finally:
        object.__setattr__(spec, name, real)
