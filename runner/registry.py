"""models.yaml as typed entries: every servable model, and how a request names one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runner.errors import FieldError
from runner.hub import is_repo_id


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    """A repository on the hub (and on disk under MODEL_DIR) that a model reads files from."""

    repo: str
    revision: str = "main"
    allow_patterns: list[str] | None = None
    file: str | None = Field(None, description="A single file of the repo this model needs.")

    @model_validator(mode="after")
    def _repo_is_hub_id(self) -> Source:
        if not is_repo_id(self.repo):
            raise ValueError(f"{self.repo!r} is not a hub repository id")
        return self


class ModelEntry(Strict):
    id: str = Field(description="The model_id callers send.")
    pipeline: str = ""
    kind: str = Field(description="The loader family; the pipeline module interprets it.")
    source: Source | None = Field(None, description="Main files; default: the repo named `id`.")
    components: dict[str, Source] = Field(
        default_factory=dict, description="Extra files from other repos, by role."
    )
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    variant: str | None = Field(None, description="Preferred weight variant, e.g. fp16.")
    options: dict[str, Any] = Field(default_factory=dict, description="Loader options.")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Values for request fields the client left unset.")
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="Values the model only works with (distilled step "
        "counts); they replace what the client sent.")
    max_concurrency: int = Field(1, ge=1)

    @property
    def main(self) -> Source:
        return self.source or Source(repo=self.id)

    def sources(self) -> list[Source]:
        return [self.main, *self.components.values()]


class PipelineModels(Strict):
    default: str
    models: list[ModelEntry]

    @model_validator(mode="after")
    def _default_is_listed(self) -> PipelineModels:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("model ids must be unique within a pipeline")
        if self.default not in ids:
            raise ValueError(f"default {self.default!r} is not among the listed models")
        return self


class ModelsFile(Strict):
    safety_checker: ModelEntry
    pipelines: dict[str, PipelineModels]


class Registry:
    """Resolves `(pipeline, model_id)` to an entry; `""` is the pipeline's default."""

    def __init__(self, spec: ModelsFile, defaults: dict[str, str] | None = None):
        self.safety_checker = spec.safety_checker.model_copy(update={"pipeline": "safety"})
        self._entries: dict[str, dict[str, ModelEntry]] = {}
        self._default: dict[str, str] = {}
        for name, group in spec.pipelines.items():
            entries = [m.model_copy(update={"pipeline": name}) for m in group.models]
            self._entries[name] = {m.id: m for m in entries}
            self._default[name] = group.default
        for name, model_id in (defaults or {}).items():
            if model_id:
                self._default[name] = self.resolve(name, model_id).id

    @classmethod
    def load(cls, path: Path, defaults: dict[str, str] | None = None) -> Registry:
        # libyaml's safe loader where PyYAML has it: 2 ms for models.yaml, 20 ms in Python
        with open(path) as f:
            spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        return cls(ModelsFile.model_validate(spec), defaults)

    @property
    def pipelines(self) -> list[str]:
        return list(self._entries)

    def entries(self, pipeline: str) -> list[ModelEntry]:
        return list(self._entries[pipeline].values())

    def default(self, pipeline: str) -> ModelEntry:
        return self._entries[pipeline][self._default[pipeline]]

    def override_defaults(self, pipeline: str, values: dict[str, Any]) -> None:
        """Give every model of `pipeline` these defaults for unset request fields, over its own
        (what go-livepeer bills for an unset size, when the operator renders what is billed)."""
        self._entries[pipeline] = {
            model_id: entry.model_copy(update={"defaults": {**entry.defaults, **values}})
            for model_id, entry in self._entries[pipeline].items()}

    def resolve(self, pipeline: str, model_id: str) -> ModelEntry:
        if not model_id:
            return self.default(pipeline)
        entry = self._entries[pipeline].get(model_id)
        if entry is None:
            known = ", ".join(sorted(self._entries[pipeline]))
            raise FieldError("model_id", f"unknown model_id {model_id!r} for {pipeline}; "
                             f"this runner serves: {known}")
        return entry
