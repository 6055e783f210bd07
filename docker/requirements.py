"""Print the requirements of the runner's dependencies and the given extras, one a line, from
pyproject.toml: the image installs them (with a constraints file) before it copies the code,
so a code change does not reinstall every library.

    python docker/requirements.py diffusion [pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    default = Path(__file__).resolve().parent.parent / "pyproject.toml"
    path = Path(sys.argv[2]) if len(sys.argv) == 3 else default
    print("\n".join(requirements(path, sys.argv[1].split(","))))
