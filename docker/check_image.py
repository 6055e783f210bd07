"""Build-time check of an image (no GPU needed): torch is the CUDA build of the version the
constraints file pins; every module of the runner imports; for every pipeline the image
serves, its REQUIRES are installed and importable and the app builds serving it, as
`python -m runner` builds it at start; and where a pipeline honours TORCH_COMPILE,
torch.compile builds a kernel. A failure stops the build instead of shipping an image whose
runner would exit at start (a missing import), refuse its PIPELINE, or fail its first
compiled request. It leaves nothing behind in the image (its caches go to a folder it deletes).

    python docker/check_image.py --constraints constraints.txt text-to-image,upscale \
        [--import sam2 torchvision]
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import traceback
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


def runner_modules() -> list[str]:
    """Why a runner module cannot be imported here, for each that cannot: the runner imports
    some of them only when a feature is used (Live Runner registration, the OpenAI routes)."""
    import runner

    errors = []
    for info in pkgutil.iter_modules(runner.__path__, "runner."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001  (any failure is the answer)
            errors.append(f"{info.name} does not import: {type(exc).__name__}: {exc}")
    return errors


def app_error(pipeline: str, scratch: Path) -> str | None:
    """Why the app cannot be built serving `pipeline` as its only pipeline, as the image runs
    it: every route, the models.yaml entries checked against the pipeline's options, the
    warm plan. Nothing is loaded and no port is bound."""
    try:
        from runner.app import create_app
        from runner.settings import Settings

        create_app(Settings(pipeline=pipeline, device="cpu", tiny=False,
                            model_dir=scratch / "models", tiny_dir=scratch / "tiny"))
    except Exception:  # noqa: BLE001
        return f"the app cannot be built serving {pipeline}:\n{traceback.format_exc()}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", help="comma list of the pipelines this image serves")
    parser.add_argument("--constraints", type=Path, required=True)
    parser.add_argument("--import", dest="imports", nargs="*", default=[],
                        help="further modules that must import (sam2, torchaudio, ...)")
    args = parser.parse_args()
    # Every file this check makes goes to one scratch folder, deleted at the end, so the image
    # carries nothing of it: torch.compile's kernels and precompiled headers (Inductor puts the
    # headers under the temporary folder whatever TORCHINDUCTOR_CACHE_DIR says), and the
    # folders libraries create at import (transformers 4.x makes ~/.cache/huggingface).
    scratch = Path(tempfile.mkdtemp(prefix="check-image-"))
    tempfile.tempdir = str(scratch)
    os.environ.update(TMPDIR=str(scratch), TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
                      TRITON_CACHE_DIR=str(scratch / "triton"), HF_HOME=str(scratch / "hf"),
                      XDG_CACHE_HOME=str(scratch / "cache"))
    try:
        return check(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check(args: argparse.Namespace, scratch: Path) -> int:
    import torch

    from runner.spec import discover

    errors: list[str | None] = []
    want = pinned(args.constraints, "torch")
    if torch.__version__.split("+")[0] != want:
        errors.append(f"torch {torch.__version__} installed, {args.constraints} pins {want}")
    if torch.version.cuda is None:
        errors.append(f"torch {torch.__version__} is a CPU build")
    errors += runner_modules()
    modules = discover(installed_only=False)
    served = discover()
    errors += check_pipelines(args.pipelines.split(","), modules, served, scratch)
    if any(hasattr(served.get(name), "warm_up") for name in args.pipelines.split(",")):
        errors.append(compile_error())
    for name in args.imports:
        importlib.import_module(name)
    errors = [e for e in errors if e]
    if errors:
        print("image check failed:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    print(f"image check: torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"serves {args.pipelines}")
    return 0


def check_pipelines(names: list[str], modules: dict, served: dict, scratch: Path
                    ) -> list[str | None]:
    from packaging.requirements import Requirement

    from runner.spec import missing_requirements

    errors: list[str | None] = []
    for name in names:
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
        errors.append(app_error(name, scratch))
    return errors


if __name__ == "__main__":
    sys.exit(main())
