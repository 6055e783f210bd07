"""How many bytes a model takes: estimated from safetensors headers before loading (no weights
read), measured from the loaded modules after."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from runner.checkpoints import safetensors_header
from runner.handle import held_elsewhere
from runner.hub import ModelFiles
from runner.registry import ModelEntry

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = {"F64", "F32", "F16", "BF16"}


def safetensors_bytes(path: Path, float_bytes: int) -> int:
    """Bytes of every tensor in the file once floats are cast to `float_bytes` each."""
    _, header = safetensors_header(path)
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        itemsize = float_bytes if info["dtype"] in FLOATS else DTYPE_BYTES.get(info["dtype"], 4)
        total += math.prod(info["shape"]) * itemsize
    return total


def weight_files(folder: Path, variant: str | None, replaced: frozenset[str] = frozenset()
                 ) -> list[Path]:
    """The weight files a loader would read: safetensors (the variant's where a folder has
    them), or pickled checkpoints where a snapshot has no safetensors at all; not those of
    the `replaced` component folders (a Lightning UNet file, the fp16-fix VAE take their
    place)."""
    if not any(folder.rglob("*.safetensors")):
        return sorted(p for ext in ("*.pt", "*.bin", "*.pth") for p in folder.rglob(ext))
    chosen = []
    for directory in {p.parent for p in folder.rglob("*.safetensors")}:
        if directory != folder and directory.relative_to(folder).parts[0] in replaced:
            continue
        files = sorted(directory.glob("*.safetensors"))
        preferred = [p for p in files if variant and _is_variant(p, variant)]
        chosen += preferred or [p for p in files if not _is_variant(p)]
    return chosen


def _is_variant(path: Path, variant: str | None = None) -> bool:
    """`x.fp16.safetensors` or, sharded, `x.fp16-00001-of-00002.safetensors`."""
    parts = path.name.split(".")
    return len(parts) > 2 and (variant is None or parts[-2].split("-")[0] == variant)


def estimate(entry: ModelEntry, files: ModelFiles, float_bytes: int) -> int:
    total = 0
    for i, source in enumerate(entry.sources()):
        if source.file:
            paths = [files.file(source.repo, source.file, source.revision)]
        else:
            # The main repo's folders that components replace are never read.
            replaced = frozenset(entry.components) if i == 0 else frozenset()
            paths = weight_files(files.folder(source.repo, source.revision), entry.variant,
                                 replaced)
        total += sum(file_bytes(p, float_bytes) for p in paths)
    return total


def file_bytes(path: Path, float_bytes: int) -> int:
    """Exact for safetensors; pickled checkpoints (.pt/.bin) are assumed fp32 on disk."""
    if path.suffix == ".safetensors":
        return safetensors_bytes(path, float_bytes)
    return path.stat().st_size * float_bytes // 4


def walk(model: Any, depth: int = 4) -> Iterator[Any]:
    """Every torch module and loose tensor reachable from `model` (a diffusers pipeline, a
    transformers model, or a plain object holding them), each object once."""
    import torch

    seen: set[int] = set()

    def visit(obj: Any, level: int) -> Iterator[Any]:
        if level > depth or id(obj) in seen or isinstance(obj, (str, bytes, int, float)):
            return
        seen.add(id(obj))
        if isinstance(obj, (torch.Tensor, torch.nn.Module)):
            yield obj
            return
        children: Iterable[Any]
        if isinstance(obj, dict):
            children = obj.values()
        elif isinstance(obj, (list, tuple)):
            children = obj
        else:
            children = getattr(obj, "__dict__", {}).values()
        for child in list(children):
            yield from visit(child, level + 1)

    yield from visit(model, 0)


def measure(model: Any) -> int:
    """Bytes of the tensors reachable from `model`, each tensor counted once. A model held by
    another process (an Ollama daemon) reports its own `resident_bytes()`."""
    import torch

    if held_elsewhere(model):
        return int(model.resident_bytes())
    seen: set[int] = set()
    total = 0
    for obj in walk(model):
        tensors = chain(obj.parameters(), obj.buffers()) if isinstance(
            obj, torch.nn.Module) else (obj,)
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
