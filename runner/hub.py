"""Where model files live: the Hugging Face hub cache layout under MODEL_DIR.

`models--org--name/snapshots/<rev>/...` is what operators already have on disk, so the real
checkpoints and the tiny ones written in CPU mode are found by the same code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from runner.errors import ModelLoadError


class FileSource(Protocol):
    """What `ModelFiles.present` reads of a registry Source (the registry imports this
    module, so not the class itself)."""

    @property
    def repo(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def file(self) -> str | None: ...


# Hub ids only: no `..`, no absolute paths, no URLs, so nothing outside MODEL_DIR is reachable.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
TINY_REVISION = "0" * 40


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name


def repo_folder(model_dir: Path, repo: str) -> Path:
    return Path(model_dir) / ("models--" + repo.replace("/", "--"))


def find_snapshot(model_dir: Path, repo: str, revision: str = "main") -> Path | None:
    """The local snapshot folder of `repo`, or None when it is not on disk."""
    if not is_repo_id(repo):
        return None
    try:
        path = snapshot_download(
            repo_id=repo, revision=revision, cache_dir=str(model_dir), local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return Path(path)


def snapshot(model_dir: Path, repo: str, revision: str = "main", model_id: str = "") -> Path:
    path = find_snapshot(model_dir, repo, revision)
    if path is None:
        hint = (f"python scripts/download_models.py --model {model_id or repo} "
                f"--model-dir {model_dir}")
        raise ModelLoadError(f"{missing(model_dir, repo, revision)}; run `{hint}`")
    return path


def missing(model_dir: Path, repo: str, revision: str = "main") -> str:
    """Why `repo` has no snapshot here, as precisely as the folder says."""
    ref = repo_folder(model_dir, repo) / "refs" / revision
    if ref.is_file():
        named = ref.read_text().strip()
        return (f"model files for {repo} are not in {model_dir}: refs/{revision} names "
                f"revision {named[:12]}, which has no snapshot folder (an interrupted download)")
    return f"model files for {repo} are not in {model_dir}"


@dataclass(frozen=True)
class ModelFiles:
    """Finds a model's files under one MODEL_DIR (the real one, or the tiny-model folder)."""

    model_dir: Path
    model_id: str = ""

    def folder(self, repo: str, revision: str = "main") -> Path:
        return snapshot(self.model_dir, repo, revision, self.model_id)

    def file(self, repo: str, filename: str, revision: str = "main") -> Path:
        path = self.folder(repo, revision) / filename
        if not path.is_file():
            raise ModelLoadError(f"{filename} is missing from {repo} in {self.model_dir}")
        return path

    def has(self, repo: str, revision: str = "main") -> bool:
        return find_snapshot(self.model_dir, repo, revision) is not None

    def present(self, sources: Iterable[FileSource]) -> bool:
        """Whether every source (repo, or single file of a repo) is on disk."""
        for source in sources:
            folder = find_snapshot(self.model_dir, source.repo, source.revision)
            if folder is None or (source.file and not (folder / source.file).is_file()):
                return False
        return True


@contextmanager
def writing_snapshot(model_dir: Path, repo: str) -> Iterator[Path]:
    """A snapshot folder to write files into; `refs/main` is written last so a half-written
    snapshot is never found."""
    root = repo_folder(model_dir, repo)
    folder = root / "snapshots" / TINY_REVISION
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(TINY_REVISION)
