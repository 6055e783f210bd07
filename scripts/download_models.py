"""Download what models.yaml lists into MODEL_DIR, in the Hugging Face cache layout the runner
reads: exactly the files each loader needs (`allow_patterns`, single component files), the
safety checker included. Resumable (the hub client resumes partial files); HF_TOKEN is used
for gated repos. `--check` downloads nothing and lists what is missing.

    python scripts/download_models.py --pipeline text-to-image            # all of a pipeline
    python scripts/download_models.py --model ByteDance/SDXL-Lightning-4step
    python scripts/download_models.py --check --pipeline all
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _common import ROOT, Registry, selected_entries

from runner.hub import ModelFiles


def download(entry, model_dir: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    for source in entry.sources():
        if source.file:
            hf_hub_download(source.repo, source.file, revision=source.revision,
                            cache_dir=model_dir)
        else:
            snapshot_download(source.repo, revision=source.revision, cache_dir=model_dir,
                              allow_patterns=source.allow_patterns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path,
                        default=Path(os.environ.get("MODEL_DIR", "/models")))
    parser.add_argument("--pipeline", default="all")
    parser.add_argument("--model", default=None, help="one model id of models.yaml")
    parser.add_argument("--check", action="store_true", help="only report what is missing")
    args = parser.parse_args()
    registry = Registry.load(ROOT / "models.yaml")
    files = ModelFiles(args.model_dir)
    missing = []
    for entry in selected_entries(registry, args.pipeline, args.model):
        if files.present(entry.sources()):
            print(f"present  {entry.id}")
        elif args.check:
            missing.append(entry.id)
            print(f"MISSING  {entry.id}")
        else:
            print(f"fetching {entry.id}")
            download(entry, args.model_dir)
    if missing:
        print(f"{len(missing)} missing; run without --check to download them", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
