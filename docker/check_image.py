"""Build-time check of an image (no GPU needed): torch is the CUDA build of the version the
constraints file pins, every pipeline the image serves is servable here, its REQUIRES
installed and importable, and where a pipeline honours TORCH_COMPILE, torch.compile builds a
kernel. A failure stops the build instead of shipping an image whose runner would refuse its
PIPELINE at start, or fail its first compiled request.

    python docker/check_image.py --constraints constraints.txt text-to-image,upscale \
        [--import sam2 torchvision]
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pinned(constraints: Path, name: str) -> str | None:
    """The exact version `name==X` in a constraints file."""
    for line in constraints.read_text().splitlines():
        match = re.fullmatch(rf"\s*{re.escape(name)}\s*==\s*([^\s;#]+).*", line, re.IGNORECASE)
        if match:
            return match.group(1)
    return None


def compile_error() -> str | None:
    """Why TORCH_COMPILE would fail here: one small function compiled by Inductor on the CPU
    needs the same C toolchain and Python headers as Triton's launchers on the GPU."""
    import torch

    from runner.device import missing_compile_toolchain

    if missing := missing_compile_toolchain():
        return f"TORCH_COMPILE cannot work: {missing}"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8))
    except Exception as exc:  # noqa: BLE001  (any failure is the answer)
        return f"TORCH_COMPILE cannot work: torch.compile failed: {exc}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", help="comma list of the pipelines this image serves")
    parser.add_argument("--constraints", type=Path, required=True)
    parser.add_argument("--import", dest="imports", nargs="*", default=[],
                        help="further modules that must import (sam2, torchaudio, ...)")
    args = parser.parse_args()

    import torch
    from packaging.requirements import Requirement

    from runner.spec import discover, missing_requirements

    errors = []
    want = pinned(args.constraints, "torch")
    if torch.__version__.split("+")[0] != want:
        errors.append(f"torch {torch.__version__} installed, {args.constraints} pins {want}")
    if torch.version.cuda is None:
        errors.append(f"torch {torch.__version__} is a CPU build")
    modules = discover(installed_only=False)
    served = discover()
    for name in args.pipelines.split(","):
        module = modules.get(name)
        if module is None:
            errors.append(f"{name} is not a pipeline module; known: {sorted(modules)}")
            continue
        absent = missing_requirements(module)
        if absent or name not in served:
            errors.append(f"{name} is not servable here: {', '.join(absent)} missing")
            continue
        for spec in getattr(module, "REQUIRES", ()):
            importlib.import_module(Requirement(spec).name)
    for name in args.imports:
        importlib.import_module(name)
    if any(hasattr(served.get(name), "warm_up") for name in args.pipelines.split(",")):
        errors.append(compile_error())
    errors = [e for e in errors if e]
    if errors:
        print("image check failed:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    print(f"image check: torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"serves {args.pipelines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
