"""The GPU suite (`pytest -m gpu tests/gpu`): skipped, every test with its reason, where torch
sees no CUDA device; the default `pytest` run deselects it (pyproject addopts `-m 'not gpu'`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


CUDA = cuda_available()
NO_CUDA = "needs a CUDA device: torch.cuda.is_available() is False here"
HAS_PARLER = importlib.util.find_spec("parler_tts") is not None
NO_PARLER = "text-to-speech needs parler_tts: run this suite with .venv-tts/bin/python"


def pytest_collection_modifyitems(config, items) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(skip)
