"""Download what models.yaml lists into MODEL_DIR, in the Hugging Face cache layout the runner
reads (`models--org--name/snapshots/<rev>/...`), or check offline what is missing.

    python scripts/download_models.py --pipeline text-to-image          # every model of it
    python scripts/download_models.py --pipeline image-to-video,upscale
    python scripts/download_models.py --model ByteDance/SDXL-Lightning-4step
    python scripts/download_models.py --check                           # all pipelines, offline

Exactly the files each loader reads are fetched:
- a source with `allow_patterns` in models.yaml: those patterns;
- a single component file (a Lightning UNet): that file; its `source` (the SDXL base: configs,
  tokenizers, text encoders, VAE) is fetched with its own patterns;
- a source without patterns (a diffusers repo named by `id`): model_index.json, each listed
  component's configs and its weights, preferring the entry's `variant` (fp16) file per
  component where the repo has one; never the single-file checkpoints, ONNX/Flax exports or the
  bundled `safety_checker/` (the runner uses its own checker, models.yaml `safety_checker`);
- the safety checker itself whenever a selected pipeline's requests have `safety_check`.

llm entries name an Ollama tag: with `--llm-backend ollama` (the default where LLM_BACKEND=ollama,
as in the llm image) they are pulled into the Ollama daemon at OLLAMA_HOST, whose models live in
OLLAMA_MODELS (default MODEL_DIR/ollama); otherwise their Hugging Face weights are fetched for
the transformers backend.

Downloads are resumable: the hub client keeps partial files (`*.incomplete`) and continues them
on the next run; files already complete are not fetched again (Ollama resumes its blobs too).
HF_TOKEN (or --token) is sent for gated repos (Llama, Gemma: accept the licence on the hub
first). The hub client's own progress bars show each file. HF_HUB_OFFLINE=1, which the images
set for the server, is overridden here: downloading is the one job meant to go online.

`--check` needs no network: it reads MODEL_DIR, prints what is present and, for everything
missing, what is missing and the exact command that fetches it; it exits 1 if anything is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT, Registry, discover

from runner import checkpoints
from runner.checkpoints import (
    SKIPPED_COMPONENTS,
    components,
    fetch_command,
    ollama_problems,
    snapshot_problems,
)
from runner.registry import ModelEntry, Source

CONFIG_SUFFIXES = (".json", ".txt", ".model")
IGNORE_PATTERNS = [f"{name}/*" for name in SKIPPED_COMPONENTS]
LLM_BACKENDS = ("transformers", "ollama")
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"


# -- what to fetch -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetch:
    """One download: a single file, a snapshot with patterns, or (patterns None) a diffusers
    repo whose files are chosen from its listing and model_index.json."""

    repo: str
    revision: str = "main"
    file: str | None = None
    allow_patterns: tuple[str, ...] | None = None
    variant: str | None = None


def fetch_for(entry: ModelEntry, source: Source) -> Fetch:
    if source.file:
        return Fetch(source.repo, source.revision, file=source.file)
    if source.allow_patterns is not None:
        return Fetch(source.repo, source.revision, allow_patterns=tuple(source.allow_patterns))
    return Fetch(source.repo, source.revision, variant=entry.variant)


def pick_weights(names: list[str], variant: str | None) -> list[str]:
    """The weight files of one component folder the loader reads: the variant's
    (`x.fp16.safetensors`, or sharded `x.fp16-00001-of-00002.safetensors`) where the folder has
    it, else the plain ones (`x.safetensors`, `x-00001-of-00002.safetensors`); safetensors
    before .bin. Other variants (`.non_ema`, ...) are never taken."""
    for ext in (".safetensors", ".bin"):
        if variant:
            pattern = rf"[^.]+\.{re.escape(variant)}(-\d+-of-\d+)?{re.escape(ext)}"
            chosen = [n for n in names if re.fullmatch(pattern, n)]
            if chosen:
                return chosen
        chosen = [n for n in names if n.endswith(ext) and "." not in n[: -len(ext)]]
        if chosen:
            return chosen
    return []


def diffusers_files(repo_files: Iterable[str], model_index: dict, variant: str | None
                    ) -> list[str]:
    """Exact paths of a diffusers repo that `from_pretrained` reads: model_index.json, and per
    listed component its configs/tokenizer files and its weights (see pick_weights)."""
    by_folder: dict[str, list[str]] = {}
    for path in repo_files:
        folder, _, name = path.rpartition("/")
        if folder and "/" not in folder:
            by_folder.setdefault(folder, []).append(name)
    chosen = ["model_index.json"]
    for folder in components(model_index):
        if folder in SKIPPED_COMPONENTS:
            continue
        names = sorted(by_folder.get(folder, []))
        chosen += [f"{folder}/{n}" for n in names if n.endswith(CONFIG_SUFFIXES)]
        chosen += [f"{folder}/{n}" for n in pick_weights(names, variant)]
    return chosen


def resolve_patterns(fetch: Fetch, model_dir: Path, token: str | None) -> list[str] | None:
    """allow_patterns for a fetch models.yaml gives none for: the files of a diffusers repo,
    chosen from the hub's listing; None (the whole repo) for any other kind of repo."""
    from huggingface_hub import HfApi, hf_hub_download

    repo_files = HfApi().list_repo_files(fetch.repo, revision=fetch.revision, token=token)
    if "model_index.json" not in repo_files:
        print(f"  {fetch.repo} is not a diffusers repo and models.yaml gives no allow_patterns: "
              "fetching the whole repo")
        return None
    index_path = hf_hub_download(fetch.repo, "model_index.json", revision=fetch.revision,
                                 cache_dir=model_dir, token=token)
    model_index = json.loads(Path(index_path).read_text())
    return diffusers_files(repo_files, model_index, fetch.variant)


def download(fetch: Fetch, model_dir: Path, token: str | None) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    if fetch.file:
        hf_hub_download(fetch.repo, fetch.file, revision=fetch.revision, cache_dir=model_dir,
                        token=token)
        return
    if fetch.allow_patterns is not None:
        patterns: list[str] | None = list(fetch.allow_patterns)
    else:
        patterns = resolve_patterns(fetch, model_dir, token)
    snapshot_download(fetch.repo, revision=fetch.revision, cache_dir=model_dir,
                      allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS, token=token)


def ollama_pull(tag: str, host: str) -> None:
    import ollama
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}
    try:
        for update in ollama.Client(host=host).pull(tag, stream=True):
            if update.digest and update.total:
                bar = bars.get(update.digest)
                if bar is None:
                    bar = bars[update.digest] = tqdm(total=update.total, unit="B",
                                                     unit_scale=True,
                                                     desc=f"{tag} {update.digest[7:19]}")
                bar.update((update.completed or 0) - bar.n)
            elif update.status:
                print(f"  {tag}: {update.status}")
    finally:
        for bar in bars.values():
            bar.close()


# -- selection and the command line --------------------------------------------------------------

def uses_safety(pipelines: Iterable[str]) -> bool:
    """Whether any of these pipelines' requests carry `safety_check` (the server's own rule
    for loading the checker)."""
    modules = discover(installed_only=False)
    return any(name in modules and "safety_check" in modules[name].Request.model_fields
               for name in pipelines)


def select(registry: Registry, pipeline: str, models: list[str] | None) -> list[ModelEntry]:
    names = registry.pipelines if pipeline == "all" else [p.strip() for p in pipeline.split(",")]
    unknown = [n for n in names if n not in registry.pipelines]
    if unknown:
        raise SystemExit(f"unknown pipeline(s) {unknown}; known: {', '.join(registry.pipelines)}")
    safety = registry.safety_checker
    entries = [e for n in names for e in registry.entries(n) if not models or e.id in models]
    wanted_safety = bool(models) and safety.id in models
    unknown_models = [m for m in models or () if m != safety.id
                      and not any(e.id == m for e in entries)]
    if unknown_models:
        raise SystemExit(f"not listed in models.yaml for {', '.join(names)}: "
                         f"{', '.join(unknown_models)}")
    if wanted_safety or (entries and uses_safety({e.pipeline for e in entries})):
        entries.append(safety)
    return entries


def entry_problems(entry: ModelEntry, tag: str | None, args: argparse.Namespace) -> list[str]:
    if tag:
        return ollama_problems(tag, args.ollama_models)
    return checkpoints.entry_problems(entry, args.model_dir)


def fetch_entry(entry: ModelEntry, tag: str | None, args: argparse.Namespace,
                done: set[Fetch]) -> None:
    """Fetch the sources of `entry` that are not complete on disk (each fetch once a run)."""
    if tag:
        ollama_pull(tag, os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST)
        return
    for source in entry.sources():
        fetch = fetch_for(entry, source)
        if fetch in done or not snapshot_problems(entry, source, args.model_dir):
            continue
        download(fetch, args.model_dir, args.token)
        done.add(fetch)


def is_gated(exc: Exception) -> bool:
    from huggingface_hub.errors import GatedRepoError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(exc, GatedRepoError) or status in (401, 403)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("MODEL_DIR", "/models")))
    parser.add_argument("--pipeline", default=None,
                        help="a pipeline, a comma list, or all (the default with --check)")
    parser.add_argument("--model", action="append", default=None,
                        help="a model id of models.yaml (repeatable); the safety checker's too")
    parser.add_argument("--check", action="store_true",
                        help="download nothing: report what is missing (offline), exit 1 if any")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN") or None,
                        help="Hugging Face token for gated repos (default: $HF_TOKEN)")
    env_backend = os.environ.get("LLM_BACKEND", "").strip().lower()
    parser.add_argument("--llm-backend", choices=LLM_BACKENDS,
                        default=env_backend if env_backend in LLM_BACKENDS else "transformers",
                        help="how llm models are fetched: Hugging Face weights (transformers) "
                             "or an Ollama pull (default: $LLM_BACKEND, else transformers)")
    parser.add_argument("--ollama-models", type=Path, default=None,
                        help="the Ollama daemon's model folder (default: $OLLAMA_MODELS, "
                             "else MODEL_DIR/ollama)")
    args = parser.parse_args(argv)
    if args.pipeline is None:
        if not args.check and not args.model:
            parser.error("name what to download: --pipeline NAME|all or --model ID")
        args.pipeline = "all"
    if args.ollama_models is None:
        env = os.environ.get("OLLAMA_MODELS")
        args.ollama_models = Path(env) if env else args.model_dir / "ollama"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    registry = Registry.load(ROOT / "models.yaml")
    entries = select(registry, args.pipeline, args.model)

    def tag_of(entry: ModelEntry) -> str | None:
        return entry.options.get("ollama_tag") if args.llm_backend == "ollama" else None

    if not args.check:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = False  # see the docstring: the images set it for the server
    missing: list[ModelEntry] = []
    failed: list[str] = []
    done: set[Fetch] = set()
    for entry in entries:
        tag = tag_of(entry)
        label = f"{entry.pipeline:<18} {entry.id}" + (f" (Ollama {tag})" if tag else "")
        problems = entry_problems(entry, tag, args)
        if not problems:
            print(f"present  {label}")
        elif args.check:
            missing.append(entry)
            command = fetch_command([entry.id], args.model_dir, "ollama" if tag else None)
            print(f"MISSING  {label}")
            print("".join(f"         - {problem}\n" for problem in problems), end="")
            print(f"         fetch: {command}")
        else:
            print(f"fetching {label}")
            try:
                fetch_entry(entry, tag, args, done)
            except Exception as exc:  # a gated repo, the network, the daemon: report, go on
                failed.append(entry.id)
                print(f"FAILED   {entry.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
                if is_gated(exc):
                    print(f"         {entry.id} is gated: accept its licence on huggingface.co, "
                          "then set HF_TOKEN", file=sys.stderr)
                continue
            left = entry_problems(entry, tag, args)
            if left:  # e.g. the repo does not carry the format its allow_patterns ask for
                failed.append(entry.id)
                print(f"INCOMPLETE {entry.id}: {'; '.join(left)}", file=sys.stderr)
    if missing:
        ids = list(dict.fromkeys(e.id for e in missing))
        print(f"\n{len(ids)} missing in {args.model_dir}; fetch them with:\n  "
              + fetch_command(ids, args.model_dir,
                              "ollama" if any(tag_of(e) for e in missing) else None),
              file=sys.stderr)
        return 1
    if failed:
        print(f"\n{len(failed)} not downloaded: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
