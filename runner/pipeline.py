"""What a pipeline module is, and how the runner finds them.

A pipeline module (one file in `pipelines/`) defines:
  NAME        the route and models.yaml key, e.g. "text-to-image"
  Request     pydantic model of the inputs; an UploadFile field makes the route multipart
  Response    pydantic model of the output
  load(entry, files, device) -> model          called in a worker thread
  run(model, request, ctx) -> Response          called in a worker thread
  build_tiny(entry, model_dir) -> None          random-weight checkpoint in the layout load reads
and may define OPERATION_ID and SUMMARY when the derived ones do not match the contract;
REQUIRES, the import names it needs at run time: a pipeline whose libraries are not installed
in this environment is not served here (text-to-speech lives in its own environment);
ERROR_STATUSES, the error statuses go-livepeer's worker reads on its route when they differ
from DECODED_ERRORS; BILLED_DEFAULTS, values go-livepeer bills unset request fields at.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import types
import typing
from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, TypeAdapter
from starlette.datastructures import UploadFile as StarletteUpload

from runner.registry import ModelEntry, Registry

REQUIRED = ("NAME", "Request", "Response", "load", "run", "build_tiny")
# What go-livepeer's generated client decodes besides 200 on a generate route
# (ai/worker/runner.gen.go); its worker turns any other status into a nil result.
DECODED_ERRORS = (400, 401, 422, 500)
log = logging.getLogger(__name__)


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
    """Pipeline modules by NAME; with `installed_only`, only those whose REQUIRES import here."""
    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
        if missing:
            raise TypeError(f"pipeline module {module.__name__} lacks {', '.join(missing)}")
        absent = missing_requirements(module)
        if installed_only and absent:
            log.debug("%s not served here: %s not installed", module.NAME, ", ".join(absent))
            continue
        found[module.NAME] = module
    return found


def operation_id(module: types.ModuleType) -> str:
    derived = "gen" + "".join(part.capitalize() for part in module.NAME.split("-"))
    return getattr(module, "OPERATION_ID", derived)


def error_statuses(module: types.ModuleType) -> tuple[int, ...]:
    return tuple(getattr(module, "ERROR_STATUSES", DECODED_ERRORS))


def billed_defaults(module: types.ModuleType) -> dict[str, Any]:
    return dict(getattr(module, "BILLED_DEFAULTS", {}))


def summary(module: types.ModuleType) -> str:
    return getattr(module, "SUMMARY", module.NAME.replace("-", " ").title())


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


def check_defaults(registry: Registry, modules: dict[str, types.ModuleType]) -> None:
    """Every models.yaml default must name a request field and fit its type; fail at start."""
    for name, module in modules.items():
        fields = module.Request.model_fields
        for entry in registry.entries(name):
            for key, value in {**entry.defaults, **entry.fixed}.items():
                if key not in fields:
                    raise ValueError(f"models.yaml: {entry.id} default {key!r} is not a field "
                                     f"of {name} requests")
                TypeAdapter(fields[key].annotation).validate_python(value)
