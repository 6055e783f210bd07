"""Write the tiny random-weight checkpoint of every listed model into a folder, in the HF
cache layout the runner reads. The server does this by itself in tiny mode; this script is
for looking at the folders, or for pointing MODEL_DIR at them.

    python scripts/make_tiny_models.py [--dir DIR] [--pipeline text-to-image] [--model ID]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import ROOT, Registry, discover, selected_entries  # noqa: E402

from runner import safety  # noqa: E402
from runner.hub import ModelFiles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".tiny-models")
    parser.add_argument("--pipeline", default="all")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    modules = discover()  # only the pipelines this environment can serve
    registry = Registry.load(ROOT / "models.yaml")
    names = sorted(modules) if args.pipeline == "all" else args.pipeline.split(",")
    unavailable = [n for n in names if n not in modules]
    if unavailable:
        raise SystemExit(f"{unavailable} cannot be built in this environment")
    needs_safety = any("safety_check" in modules[n].Request.model_fields for n in names)
    modules["safety"] = safety
    for entry in selected_entries(registry, ",".join(names), args.model, needs_safety):
        if ModelFiles(args.dir).present(entry.sources()):
            print(f"present  {entry.id}")
            continue
        started = time.perf_counter()
        modules[entry.pipeline].build_tiny(entry, args.dir)
        print(f"built    {entry.id}  ({time.perf_counter() - started:.2f}s)")
    print(f"tiny models in {args.dir}")


if __name__ == "__main__":
    main()
