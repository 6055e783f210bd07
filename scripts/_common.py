"""Shared by the scripts: repo root on sys.path, the registry and pipeline modules."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runner.registry import ModelEntry, Registry  # noqa: E402
from runner.spec import discover  # noqa: E402


def selected_entries(registry: Registry, pipeline: str, model: str | None,
                     with_safety: bool = True) -> list[ModelEntry]:
    """The entries named by --pipeline (a name, a comma list, or all) and --model."""
    names = registry.pipelines if pipeline == "all" else pipeline.split(",")
    unknown = [n for n in names if n not in registry.pipelines]
    if unknown:
        raise SystemExit(f"unknown pipeline(s) {unknown}; known: {registry.pipelines}")
    entries = [e for n in names for e in registry.entries(n) if model in (None, e.id)]
    if model and not entries:
        raise SystemExit(f"{model} is not listed in models.yaml for {names}")
    return entries + ([registry.safety_checker] if with_safety else [])


__all__ = ["ROOT", "discover", "Registry", "selected_entries"]
