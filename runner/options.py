"""A pipeline's per-model `options:` in models.yaml, as a typed model.

Each pipeline declares `class Options(runner.options.Options)` with a field (and its default)
per key it reads; the runner validates every entry's options against it at start, so a
misspelt key stops the runner naming the model and the key instead of being ignored."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict

from runner.registry import ModelEntry


class Options(BaseModel):
    """No options: a pipeline that reads none rejects any `options:` key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, entry: ModelEntry) -> Self:
        """The entry's options, typed, with this model's defaults for the keys it leaves out."""
        return cls.model_validate(entry.options)
