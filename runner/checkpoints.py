"""What a model's files on disk lack, found offline without loading anything: the runner's
check before it binds its port, and `scripts/download_models.py --check`.

A snapshot is complete when the files its loader reads are there and whole: every weight
pattern matched, every diffusers component folder holding weights, no link to a missing blob,
every JSON file parseable, every safetensors file exactly as long as its header says, every
zip-format checkpoint (`.pt`, `.bin`) with its central directory. An interrupted download fails
one of these.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import struct
import zipfile
from pathlib import Path

from runner.hub import find_snapshot, missing
from runner.registry import ModelEntry, Source

SCRIPT = "scripts/download_models.py"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# diffusers repos that bundle the SD safety checker: the loaders pass safety_checker=None and
# the runner checks images with its own (models.yaml `safety_checker`), so it is never fetched.
SKIPPED_COMPONENTS = ("safety_checker",)
# model_index.json classes that hold no weights
NO_WEIGHTS = re.compile(r"(Tokenizer|TokenizerFast|Scheduler|Processor|FeatureExtractor)$")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def components(model_index: dict) -> dict[str, str]:
    """Folder -> class name of each component model_index.json lists (skipping `null`s)."""
    out = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if value[0] is not None and value[1] is not None:
            out[name] = str(value[1])
    return out


def entry_problems(entry: ModelEntry, model_dir: Path) -> list[str]:
    return [p for source in entry.sources() for p in snapshot_problems(entry, source, model_dir)]


def snapshot_problems(entry: ModelEntry, source: Source, model_dir: Path) -> list[str]:
    folder = find_snapshot(model_dir, source.repo, source.revision)
    if folder is None:
        return [missing(model_dir, source.repo, source.revision)]
    if source.file:
        path = folder / source.file
        if not path.is_file():
            return [f"{source.repo}/{source.file} is missing"]
        return [f"{source.repo}/{source.file}: {p}" for p in [file_problem(path)] if p]
    paths = [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    problems = [f"{source.repo}/{p.relative_to(folder).as_posix()}: {problem}"
                for p in paths if (problem := file_problem(p))]
    files = [p.relative_to(folder).as_posix() for p in paths if p.is_file()]
    return problems + layout_problems(entry, source, folder, files)


def layout_problems(entry: ModelEntry, source: Source, folder: Path,
                    files: list[str]) -> list[str]:
    """Files the loader needs that the snapshot does not have."""
    problems = []
    for pattern in source.allow_patterns or ():
        if pattern.endswith(WEIGHT_SUFFIXES) and not any(fnmatch.fnmatch(f, pattern)
                                                         for f in files):
            problems.append(f"{source.repo}: no file matches {pattern}")
    if "model_index.json" in files:
        try:
            model_index = json.loads((folder / "model_index.json").read_text())
        except ValueError:
            return problems  # file_problem has said so
        supplied = set(entry.components)  # e.g. a Lightning UNet replaces the base's unet
        for name, cls in components(model_index).items():
            if name in SKIPPED_COMPONENTS or name in supplied:
                continue
            present = [f for f in files if f.startswith(f"{name}/")]
            if not present:
                problems.append(f"{source.repo}: {name}/ is missing")
            elif not NO_WEIGHTS.search(cls) and not any(f.endswith(WEIGHT_SUFFIXES)
                                                         for f in present):
                problems.append(f"{source.repo}: {name}/ has no weights")
    elif not problems and not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        problems.append(f"{source.repo}: no weights in the snapshot")
    return problems


def file_problem(path: Path) -> str | None:
    """Why a file of a snapshot cannot be read whole, or None."""
    if not path.exists():
        return "a link to a missing file (an interrupted download?)"
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".safetensors":
            return safetensors_problem(path)
        elif path.suffix in (".pt", ".bin", ".pth", ".ckpt"):
            return zip_problem(path)
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON (truncated?)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def safetensors_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's header length and header, read without its tensors; ValueError
    saying why for a file too short or broken to have one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("truncated: shorter than a safetensors header")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("truncated: the file ends inside its header")
        try:
            return header_bytes, json.loads(f.read(header_bytes))
        except ValueError:
            raise ValueError("its header is not valid JSON (truncated or corrupt)") from None


def safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        header_bytes, header = safetensors_header(path)
    except ValueError as exc:
        return str(exc)
    ends = [info["data_offsets"][1] for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict) and "data_offsets" in info]
    expected = 8 + header_bytes + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return f"{state}: {size} bytes, its header describes {expected}"
    return None


def zip_problem(path: Path) -> str | None:
    """torch.save writes zip archives; one cut short has no central directory at its end.
    Older pickle-format files carry no such check and pass."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    return None if zipfile.is_zipfile(path) else "truncated: the zip archive has no end"


# -- Ollama's model store -------------------------------------------------------------------------

def ollama_manifest(ollama_dir: Path, tag: str) -> Path:
    """Where the Ollama daemon keeps a pulled model's manifest (`llama3.1:8b` ->
    manifests/registry.ollama.ai/library/llama3.1/8b)."""
    name, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "")
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return ollama_dir.joinpath("manifests", *parts, version or "latest")


def ollama_problems(tag: str, ollama_dir: Path) -> list[str]:
    manifest = ollama_manifest(ollama_dir, tag)
    if not manifest.is_file():
        return [f"Ollama model {tag} is not in {ollama_dir}"]
    try:
        data = json.loads(manifest.read_text())
    except ValueError:
        return [f"Ollama model {tag}: its manifest {manifest} is not valid JSON"]
    layers = [data.get("config", {}), *data.get("layers", [])]
    missing = [layer["digest"] for layer in layers if layer.get("digest") and not
               (ollama_dir / "blobs" / layer["digest"].replace(":", "-")).is_file()]
    return [f"Ollama model {tag}: blob {d} is missing" for d in missing]


def fetch_command(models: list[str], model_dir: Path, llm_backend: str | None = None) -> str:
    """The exact command that downloads `models` into `model_dir`."""
    args = ["python", SCRIPT]
    for model in models:
        args += ["--model", model]
    args += ["--model-dir", str(model_dir)]
    if llm_backend:
        args += ["--llm-backend", llm_backend]
    return shlex.join(args)
