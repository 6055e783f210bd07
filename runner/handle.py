"""What the runner assumes of a loaded model, whatever its pipeline: usually nothing (a torch
object it can measure, move and drop), unless the model says otherwise through one of these
protocols."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class HeldElsewhere(Protocol):
    """A model another process holds for this runner (an Ollama daemon's): the cache counts
    the bytes it reports and can neither measure nor move it."""

    def resident_bytes(self) -> int: ...


@runtime_checkable
class Unloadable(Protocol):
    """A model whose memory is not freed by dropping the object: `unload()` frees it."""

    def unload(self) -> None: ...


def held_elsewhere(model: Any) -> bool:
    return isinstance(model, HeldElsewhere)


def movable(model: Any) -> bool:
    """In-process models can change tier; one a daemon holds cannot."""
    return model is not None and not held_elsewhere(model)


def unload_model(model: Any) -> None:
    """Frees a model the cache let go of: `unload()` where it has one, else dropping it is
    enough."""
    if isinstance(model, Unloadable):
        model.unload()
