"""A stand-in for the three torchvision transforms the sam2 package's image predictor imports
(`sam2/utils/transforms.py`: ToTensor, Resize, Normalize), for machines where torchvision
cannot be used: here the only reachable wheel is a CUDA build whose ops cannot load on the CPU
torch, and installing it breaks diffusers' imports. What sam2 passes them behaves as
torchvision's does: an HxWx3 uint8 array becomes a 3xHxW float tensor in [0, 1], a bilinear
antialiased resize to a fixed size, per-channel normalization; Resize and Normalize are
TorchScript modules, as sam2 scripts them."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


class ToTensor:
    def __call__(self, picture) -> torch.Tensor:
        array = np.asarray(picture)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


class Resize(nn.Module):
    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear",
                            align_corners=False, antialias=True)
        return out.squeeze(0)


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def usable_torchvision() -> bool:
    try:
        import torchvision.transforms  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: a CUDA build on a CPU torch
        return False
    return True


def provide(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision.transforms for the rest of the test: the real one where it works, else
    this stand-in (taken away again when the test ends)."""
    if usable_torchvision():
        return
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    for module in (package, transforms):  # found by importlib.util.find_spec, as installed
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    transforms.ToTensor, transforms.Resize, transforms.Normalize = ToTensor, Resize, Normalize
    package.transforms = transforms  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
