"""A pipeline module, read once into a typed, frozen spec.

The runner never reads a pipeline module's attributes anywhere else: `read()` checks the
required names and every hook's signature when the module is discovered, fills the optional
hooks with their defaults (all of them here), and the rest of the runner calls the spec.
`reference()` writes what a pipeline may define as markdown, for docs/architecture.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import pkgutil
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile as StarletteUpload

from runner.context import RunContext
from runner.device import Device, move_model
from runner.hub import ModelFiles
from runner.options import Options
from runner.registry import ModelEntry, Registry
from runner.sample import Sample, Scale

# What go-livepeer's generated client decodes besides 200 on a generate route
# (ai/worker/runner.gen.go); its worker turns any other status into a nil result.
DECODED_ERRORS = (400, 401, 422, 500)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Name:
    """One name a pipeline module may define: its documented form, whether it must, how many
    positional arguments it takes (None: not a function), what it is for and its default."""

    name: str
    form: str
    doc: str
    params: int | None = None
    required: bool = False
    default: str = ""
    flavour: str = ""  # "async" (a coroutine function) or "async generator"


NAMES = (
    Name("NAME", "str", "The route and the models.yaml key, e.g. `text-to-image`.", required=True),
    Name("Request", "pydantic model", "The inputs; an upload field makes the route multipart.",
         required=True),
    Name("Response", "pydantic model", "The output.", required=True),
    Name("load", "load(entry, files, device) -> model", "Load a model (worker thread).",
         params=3, required=True),
    Name("run", "run(model, request, ctx: RunContext) -> Response",
         "Answer one request (worker thread; a coroutine function runs on the event loop).",
         params=3, required=True),
    Name("build_tiny", "build_tiny(entry, model_dir) -> None",
         "Write a random-weight checkpoint in the layout `load` reads.", params=2,
         required=True),
    Name("Options", "runner.options.Options subclass",
         "The models.yaml `options:` its models take; unknown keys stop the runner at start.",
         default="no options"),
    Name("stream", "async stream(model, request, ctx) -> AsyncIterator[chunk]",
         "Answer a request with `stream: true` as server-sent events.", params=3,
         default="no streaming", flavour="async generator"),
    Name("estimate", "estimate(entry, files, float_bytes) -> int | None",
         "A model's resident bytes when the file-size estimate is wrong (None: use it).",
         params=3, default="weights' size on disk at the serving precision"),
    Name("working_memory", "working_memory(entry, files, request, float_bytes) -> int",
         "Bytes a run of this request needs beside the weights, from the model's architecture "
         "(its config in `files`) and the request's size.", params=4, default="0"),
    Name("largest_fitting", "largest_fitting(entry, request, fraction) -> str",
         "What request size would fit in `fraction` of this one's working memory (the 422's "
         "hint).", params=3, default="no hint"),
    Name("move", "move(model, target) -> None", "Move a model between the device and CPU RAM.",
         params=2, default="every torch module reachable from the model"),
    Name("warm_up", "warm_up(model, entry) -> None",
         "One run at the served sizes, so TORCH_COMPILE compiles before the first request.",
         params=2, default="not compiled"),
    Name("health", "async health(model) -> bool",
         "Whether a model another process serves is still there (/health says ERROR if not).",
         params=1, default="always healthy", flavour="async"),
    Name("file_problems", "file_problems(entry, files) -> list[str] | None",
         "What a model's files lack (None: the generic checkpoint check).", params=2,
         default="runner/checkpoints.py's check"),
    Name("sample_request", "sample_request(scale: runner.sample.Scale) -> runner.sample.Sample",
         "A sensible request at a given size, for the benchmarks.", params=1,
         default="not benchmarked"),
    Name("REQUIRES", "tuple[str, ...]", "Import names (with optional versions) it needs; "
         "missing ones mean the pipeline is not served in this environment.", default="()"),
    Name("ERROR_STATUSES", "tuple[int, ...]",
         "Error statuses go-livepeer decodes on its route.", default=str(DECODED_ERRORS)),
    Name("BILLED_DEFAULTS", "dict", "Values go-livepeer bills unset request fields at.",
         default="{}"),
    Name("OPERATION_ID", "str", "The contract's operationId.", default="gen + the name"),
    Name("SUMMARY", "str", "The contract's summary.", default="the name in title case"),
    Name("OPENAI_CHAT", "bool", "Also serve it as the OpenAI chat API under /v1.",
         default="False"),
)
HOOKS = {n.name: n for n in NAMES if n.params is not None}


def _no_estimate(entry: ModelEntry, files: ModelFiles, float_bytes: int) -> int | None:
    return None


def _no_file_check(entry: ModelEntry, files: ModelFiles) -> list[str] | None:
    return None


async def _always_healthy(model: Any) -> bool:
    return True


@dataclass(frozen=True)
class ModelHooks:
    """What the model lifecycle calls: how a model of this pipeline loads, moves, is sized and
    checked. The safety checker has these and nothing else."""

    load: Callable[[ModelEntry, ModelFiles, Device], Any]
    build_tiny: Callable[[ModelEntry, Path], None]
    options: type[Options] = Options
    estimate: Callable[[ModelEntry, ModelFiles, int], int | None] = _no_estimate
    file_problems: Callable[[ModelEntry, ModelFiles], list[str] | None] = _no_file_check
    move: Callable[[Any, Any], None] = move_model
    warm_up: Callable[[Any, ModelEntry], None] | None = None
    health: Callable[[Any], Awaitable[bool]] = _always_healthy


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline as the runner uses it: the route's types and metadata, the request path's
    hooks, and its models' lifecycle hooks."""

    name: str
    doc: str
    request: type[BaseModel]
    response: type[BaseModel]
    hooks: ModelHooks
    run: Callable[[Any, Any, RunContext], Any]
    run_is_async: bool = False
    stream: Callable[[Any, Any, RunContext], AsyncIterator[BaseModel]] | None = None
    working_memory: Callable[[ModelEntry, ModelFiles, Any, int], int] | None = None
    largest_fitting: Callable[[ModelEntry, Any, float], str] | None = None
    sample_request: Callable[[Scale], Sample] | None = None
    requires: tuple[str, ...] = ()
    error_statuses: tuple[int, ...] = DECODED_ERRORS
    billed_defaults: dict[str, Any] = field(default_factory=dict)
    operation_id: str = ""
    summary: str = ""
    openai_chat: bool = False

    @property
    def multipart(self) -> bool:
        return is_multipart(self.request)

    @property
    def checks_safety(self) -> bool:
        """Its requests may ask for the safety checker (a `safety_check` field)."""
        return "safety_check" in self.request.model_fields

    def model_id(self, request: BaseModel) -> str:
        """The models.yaml id a request names (a `model_id` field or property); "" is the
        default model."""
        return str(getattr(request, "model_id", "") or "")

    def wants_safety_check(self, request: BaseModel) -> bool:
        return self.checks_safety and bool(getattr(request, "safety_check", False))

    def wants_stream(self, request: BaseModel) -> bool:
        return self.stream is not None and bool(getattr(request, "stream", False))

    def check_entries(self, registry: Registry) -> None:
        """Every models.yaml entry of this pipeline: its defaults name request fields of the
        right type and its options are ones the pipeline reads; a mistake stops the start."""
        fields = self.request.model_fields
        for entry in registry.entries(self.name):
            for key, value in {**entry.defaults, **entry.fixed}.items():
                if key not in fields:
                    raise ValueError(f"models.yaml: {entry.id} default {key!r} is not a field "
                                     f"of {self.name} requests")
                TypeAdapter(fields[key].annotation or Any).validate_python(value)
            check_options(self.hooks.options, entry)


def check_options(options: type[Options], entry: ModelEntry) -> None:
    try:
        options.of(entry)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ValueError(f"models.yaml: {entry.id} options: {problems}") from None


def read(module: types.ModuleType) -> PipelineSpec:
    """The module's spec; a missing name or a hook of the wrong shape is a TypeError naming
    the module and the expected signature."""
    missing = [n.name for n in NAMES if n.required and not hasattr(module, n.name)]
    if missing:
        raise TypeError(f"pipeline module {module.__name__} lacks {', '.join(missing)}")
    found = _found_hooks(module)
    name: str = module.NAME
    return PipelineSpec(
        name=name, doc=inspect.getdoc(module) or "", request=module.Request,
        response=module.Response, hooks=_hooks(module, found), run=found["run"],
        run_is_async=inspect.iscoroutinefunction(found["run"]), stream=found.get("stream"),
        working_memory=found.get("working_memory"),
        largest_fitting=found.get("largest_fitting"),
        sample_request=found.get("sample_request"),
        requires=tuple(getattr(module, "REQUIRES", ())),
        error_statuses=tuple(getattr(module, "ERROR_STATUSES", DECODED_ERRORS)),
        billed_defaults=dict(getattr(module, "BILLED_DEFAULTS", {})),
        operation_id=getattr(module, "OPERATION_ID",
                             "gen" + "".join(p.capitalize() for p in name.split("-"))),
        summary=getattr(module, "SUMMARY", name.replace("-", " ").title()),
        openai_chat=bool(getattr(module, "OPENAI_CHAT", False)))


def read_hooks(module: types.ModuleType) -> ModelHooks:
    """Only the lifecycle hooks (the safety checker's module)."""
    return _hooks(module, _found_hooks(module))


def _found_hooks(module: types.ModuleType) -> dict[str, Callable]:
    """The hooks the module defines, each checked against its documented shape."""
    return {name: _checked(module, hook) for name, hook in HOOKS.items()
            if hasattr(module, name)}


def _hooks(module: types.ModuleType, found: dict[str, Callable]) -> ModelHooks:
    options = getattr(module, "Options", Options)
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise TypeError(f"{module.__name__}.Options must subclass runner.options.Options")
    lifecycle = {n: found[n] for n in ("estimate", "file_problems", "move", "warm_up", "health")
                 if n in found}
    return ModelHooks(load=found["load"], build_tiny=found["build_tiny"], options=options,
                      **lifecycle)


def _checked(module: types.ModuleType, hook: Name) -> Callable:
    fn = getattr(module, hook.name)
    where = f"{module.__name__}.{hook.name}"
    if not callable(fn):
        raise TypeError(f"{where} must be a function: {hook.form}")
    try:
        inspect.signature(fn).bind(*range(hook.params or 0))
    except TypeError:
        raise TypeError(f"{where} must take {hook.params} arguments: {hook.form}") from None
    if hook.flavour == "async" and not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{where} must be a coroutine function: {hook.form}")
    if hook.flavour == "async generator" and not inspect.isasyncgenfunction(fn):
        raise TypeError(f"{where} must be an async generator: {hook.form}")
    return fn


def reference() -> str:
    """What a pipeline module may define, as a markdown table (docs/architecture.md)."""
    rows = ["| name | form | | what it is for | default |", "|---|---|---|---|---|"]
    for n in NAMES:
        need = "required" if n.required else "optional"
        rows.append(f"| `{n.name}` | `{n.form}` | {need} | {n.doc} | {n.default or '-'} |")
    return "\n".join(rows) + "\n"


# -- finding pipeline modules ----------------------------------------------------------------

def missing_requirements(module: types.ModuleType) -> list[str]:
    """REQUIRES entries not satisfied here: an import name, optionally with a version range
    of the distribution of the same name (`"transformers>=4.56"`)."""
    return [spec for spec in getattr(module, "REQUIRES", ()) if not _satisfied(spec)]


def _satisfied(spec: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    requirement = Requirement(spec)
    if importlib.util.find_spec(requirement.name) is None:
        return False
    if not requirement.specifier:
        return True
    try:
        return requirement.specifier.contains(version(requirement.name), prereleases=True)
    except PackageNotFoundError:
        return False


def discover(package: str = "pipelines", installed_only: bool = True
             ) -> dict[str, types.ModuleType]:
    """Pipeline modules (or packages) by NAME, each checked by `read`; with `installed_only`,
    only those whose REQUIRES import here."""
    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        spec = read(module)
        absent = missing_requirements(module)
        if installed_only and absent:
            log.debug("%s not served here: %s not installed", spec.name, ", ".join(absent))
            continue
        found[spec.name] = module
    return found


# -- requests --------------------------------------------------------------------------------

def is_multipart(request: type[BaseModel]) -> bool:
    def has_upload(annotation: Any) -> bool:
        if annotation is UploadFile:
            return True
        return any(has_upload(arg) for arg in typing.get_args(annotation))

    return any(has_upload(f.annotation) for f in request.model_fields.values())


def rewind_uploads(request: BaseModel) -> None:
    """Put every uploaded file back at its start: a run that is retried (after an out-of-memory
    error) reads its uploads again, and the first attempt has read them to the end."""
    for value in request.__dict__.values():
        if isinstance(value, StarletteUpload):  # the form parser makes these, not fastapi's
            value.file.seek(0)


def with_defaults(request: BaseModel, entry: ModelEntry) -> BaseModel:
    """Fields the client left unset (None) take the model's own defaults from models.yaml;
    the model's fixed values replace whatever was sent."""
    update = {k: v for k, v in entry.defaults.items() if getattr(request, k, None) is None}
    update.update(entry.fixed)
    return request.model_copy(update=update) if update else request


def check_defaults(registry: Registry, specs: dict[str, PipelineSpec]) -> None:
    """Every served pipeline's models.yaml entries, checked at start (`check_entries`)."""
    for spec in specs.values():
        spec.check_entries(registry)


if __name__ == "__main__":  # the table docs/architecture.md carries
    print(reference(), end="")
