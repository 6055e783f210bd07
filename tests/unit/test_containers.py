"""The container set-up against the code, without a Docker engine: docker/Dockerfile (its
targets read as the images they build), docker-bake.hcl, compose.yaml, the go-livepeer examples
in docs/examples, and the llm image's entrypoint (run against a fake Ollama daemon)."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import runner
from runner import views
from runner.registry import Registry
from runner.settings import OPTIMISATION_FLAGS, REPO_ROOT, Settings
from runner.spec import discover
from tests.support import golivepeer
from tests.support.helpers import HANG_S, free_port


def load(path: Path):
    """A docker/ helper script as a module (docker/ is no package and stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(f"docker_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_image = load(REPO_ROOT / "docker" / "check_image.py")
image_requirements = load(REPO_ROOT / "docker" / "requirements.py")

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
BAKE = REPO_ROOT / "docker-bake.hcl"
COMPOSE = REPO_ROOT / "compose.yaml"
CPU_COMPOSE = REPO_ROOT / "compose.cpu.yaml"
EXAMPLES = REPO_ROOT / "docs" / "examples"
REGISTRY = Registry.load(REPO_ROOT / "models.yaml")
MODULES = discover(installed_only=False)
PORT = Settings.model_fields["port"].default
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}
# Variables the images set for software other than the runner (Python, pip, the hub, Ollama).
THIRD_PARTY_ENV = {"PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONUNBUFFERED",
                   "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
                   "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                   "OLLAMA_MODELS", "OLLAMA_NUM_PARALLEL"}
# The fields of go-livepeer's aiModels.json entries (core.AIModelConfig).
AI_MODEL_FIELDS = {"pipeline", "model_id", "url", "token", "warm", "capacity",
                   "optimization_flags", "gateway", "price_per_unit", "pixels_per_unit",
                   "currency"}


def env_read_by_code() -> set[str]:
    """Environment variables runner/ and pipelines/ (their packages too) read directly
    (os.environ)."""
    names = set()
    for path in [*REPO_ROOT.glob("runner/*.py"), *REPO_ROOT.glob("pipelines/**/*.py")]:
        names |= set(re.findall(r"environ(?:\.get\(|\[|\.setdefault\()\s*[\"']([A-Z0-9_]+)[\"']",
                                path.read_text()))
    return names


KNOWN_ENV = SETTINGS_ENV | env_read_by_code() | set(OPTIMISATION_FLAGS) | THIRD_PARTY_ENV


# -- a Dockerfile reader -------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    parent: str  # the FROM image or stage
    instructions: list[tuple[str, str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    out = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage = None
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            stage = Stage(match.group(2) or f"stage{len(stages)}", match.group(1))
            stages[stage.name] = stage
        elif stage is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stage.instructions.append((keyword, rest))
    return global_args, stages


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: variables.get(m.group(1), m.group(0)), value)


def pairs(rest: str, variables: dict[str, str]) -> dict[str, str]:
    out = {}
    for token in shlex.split(rest):
        key, sep, value = token.partition("=")
        assert sep, f"use KEY=value, not {rest!r}"
        out[key] = substitute(value, variables)
    return out


@dataclass
class Image:
    """What a target's image is configured with, its parent stages included."""

    target: str
    stages: list[Stage]
    args: dict[str, str]
    env: dict[str, str]
    labels: dict[str, str]
    expose: list[str]
    volumes: list[str]
    user: str | None
    healthcheck: str | None
    entrypoint: list[str] | None
    cmd: list[str] | None

    def runs(self) -> list[str]:
        return [rest for s in self.stages for k, rest in s.instructions if k == "RUN"]

    def copies(self) -> list[str]:
        return [rest for s in self.stages for k, rest in s.instructions if k == "COPY"]


def image(target: str) -> Image:
    global_args, stages = parse_dockerfile()
    chain = []
    name = target
    while name in stages:
        chain.insert(0, stages[name])
        name = stages[name].parent
    img = Image(target, chain, {}, {}, {}, [], [], None, None, None, None)
    for stage in chain:
        args: dict[str, str] = {}
        for keyword, rest in stage.instructions:
            variables = {**args, **img.env}
            if keyword == "ARG":
                key, sep, default = rest.partition("=")
                args[key] = default if sep else global_args.get(key, "")
            elif keyword == "ENV":
                img.env.update(pairs(rest, variables))
            elif keyword == "LABEL":
                img.labels.update(pairs(rest, variables))
            elif keyword == "EXPOSE":
                img.expose = [p.split("/")[0] for p in rest.split()]
            elif keyword == "VOLUME":
                img.volumes = json.loads(rest) if rest.startswith("[") else rest.split()
            elif keyword == "USER":
                img.user = rest
            elif keyword == "HEALTHCHECK":
                img.healthcheck = rest
            elif keyword in ("ENTRYPOINT", "CMD"):
                setattr(img, keyword.lower(), json.loads(rest))
        img.args = args  # the target's own ARGs
    return img


def targets() -> list[str]:
    """The Dockerfile's image targets: stages no other stage builds on, from the runner base."""
    _, stages = parse_dockerfile()
    parents = {s.parent for s in stages.values()}
    return [n for n, s in stages.items() if n not in parents and s.parent in stages]


IMAGES = {name: image(name) for name in targets()}


def served(img: Image) -> list[str]:
    return img.labels["org.livepeer.runner.pipelines"].split(",")


def constraints_of(img: Image) -> Path:
    (name,) = {m for run in img.runs() for m in re.findall(r"-c /build/(\S+)", run)}
    return REPO_ROOT / name


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


# -- docker-bake.hcl -----------------------------------------------------------------------------

def hcl_blocks(text: str) -> list[tuple[str, str, str]]:
    """(kind, label, body) of each top-level block."""
    text = "\n".join(line.split("#")[0] for line in text.splitlines())
    out, i = [], 0
    for match in re.finditer(r'^(\w+)\s+"([^"]+)"\s*\{', text, re.MULTILINE):
        if match.start() < i:
            continue
        depth, j = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append((match.group(1), match.group(2), text[match.end():j - 1]))
        i = j
    return out


def hcl_value(body: str, key: str):
    match = re.search(rf"^\s*{key}\s*=\s*(\[[^\]]*\]|\"[^\"]*\")", body, re.MULTILINE)
    if match is None:
        return None
    raw = match.group(1)
    return re.findall(r'"([^"]*)"', raw) if raw.startswith("[") else raw.strip('"')


def bake() -> tuple[dict[str, str], dict[str, dict], dict[str, list[str]]]:
    """Variables (defaults), targets (attributes, inherited ones resolved), groups."""
    blocks = hcl_blocks(BAKE.read_text())
    variables = {label: hcl_value(body, "default") for kind, label, body in blocks
                 if kind == "variable"}
    raw = {label: body for kind, label, body in blocks if kind == "target"}
    groups = {label: hcl_value(body, "targets") for kind, label, body in blocks if kind == "group"}

    def resolve(name: str) -> dict:
        attrs: dict = {}
        for parent in hcl_value(raw[name], "inherits") or []:
            attrs.update(resolve(parent))
        for key in ("context", "dockerfile", "target", "tags", "platforms"):
            value = hcl_value(raw[name], key)
            if value is not None:
                attrs[key] = value
        return attrs

    return variables, {name: resolve(name) for name in raw}, groups


VARIABLES, BAKE_TARGETS, GROUPS = bake()


def bake_tags() -> dict[str, str]:
    """Image tag (with the variables' defaults) -> Dockerfile target."""
    out = {}
    for attrs in BAKE_TARGETS.values():
        for tag in attrs.get("tags", []):
            out[substitute(tag, VARIABLES)] = attrs.get("target")
    return out


def compose_value(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


COMPOSE_SPEC = yaml.safe_load(COMPOSE.read_text())
SERVICES = COMPOSE_SPEC["services"]


# -- the images ----------------------------------------------------------------------------------

def test_the_dockerfile_has_the_five_family_images():
    assert set(IMAGES) == {"diffusion", "speech-vision", "text-to-speech",
                           "segment-anything-2", "llm"}
    for img in IMAGES.values():
        assert img.stages[0].name == "base"
        assert img.stages[0].parent.startswith("${CUDA_IMAGE}")


def test_every_pipeline_module_is_served_by_exactly_one_image():
    modules = sorted(m.name for m in pkgutil.iter_modules([str(REPO_ROOT / "pipelines")])
                     if not m.name.startswith("_"))
    names = {MODULES[n].NAME for n in MODULES}
    assert len(names) == len(modules)
    count = Counter(p for img in IMAGES.values() for p in served(img))
    assert set(count) == names
    assert [p for p, n in count.items() if n != 1] == []


def test_each_image_installs_what_its_pipelines_require():
    pyproject = REPO_ROOT / "pyproject.toml"
    for name, img in IMAGES.items():
        extras = img.labels["org.livepeer.runner.extras"].split(",")
        assert extras == img.args["EXTRAS"].split(",")
        assert any("requirements.py $EXTRAS" in run for run in img.runs()), name
        installed = {canonicalize_name(Requirement(r).name)
                     for r in image_requirements.requirements(pyproject, extras)}
        pinned = pins(constraints_of(img))
        for pipeline in served(img):
            for spec in getattr(MODULES[pipeline], "REQUIRES", ()):
                req = Requirement(spec)
                dist = canonicalize_name(req.name)
                assert dist in installed, f"{name}: {pipeline} needs {spec}, extras {extras}"
                assert dist in pinned, f"{constraints_of(img).name} does not pin {dist}"
                assert req.specifier.contains(pinned[dist], prereleases=True), (
                    f"{name}: {pipeline} needs {spec}, {constraints_of(img).name} pins "
                    f"{pinned[dist]}")


def test_each_image_checks_its_pipelines_and_constraints_at_build():
    for name, img in IMAGES.items():
        checks = [run for run in img.runs() if "docker/check_image.py" in run]
        assert len(checks) == 1, name
        assert f"--constraints {constraints_of(img).name} $PIPELINES" in checks[0]


def test_images_whose_pipelines_compile_have_the_toolchain_torch_compile_needs():
    # TORCH_COMPILE builds kernels at run time (gcc/g++ against Python.h); check_image.py
    # compiles one at build time for the images that serve such a pipeline.
    compiling = {n for n, m in MODULES.items() if hasattr(m, "warm_up")}
    assert compiling, "no pipeline honours TORCH_COMPILE any more"
    for name, img in IMAGES.items():
        if not compiling & set(served(img)):
            continue
        packages = {word for run in img.runs() if "apt-get install" in run
                    for word in run.split()}
        assert {"gcc", "g++", "libc6-dev", "python3-dev"} <= packages, name


def test_text_to_speech_has_its_own_environment():
    tts = IMAGES["text-to-speech"]
    assert constraints_of(tts).name == "constraints-tts.txt"
    assert served(tts) == ["text-to-speech"]
    assert all(constraints_of(img).name == "constraints.txt"
               for name, img in IMAGES.items() if name != "text-to-speech")
    assert "torchaudio" in next(r for r in tts.runs() if "check_image.py" in r)


def test_torch_is_the_cuda_build_of_the_pinned_version():
    global_args, _ = parse_dockerfile()
    version = global_args["TORCH_VERSION"]
    assert version == pins(REPO_ROOT / "constraints.txt")["torch"]
    assert version == pins(REPO_ROOT / "constraints-tts.txt")["torch"]
    cuda = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)",
                        global_args["TORCH_INDEX"])
    assert cuda, global_args["TORCH_INDEX"]
    # the base image's CUDA is torch's (and torchaudio's 13.0 build needs torch at 13.0 too)
    assert f":{cuda.group(1)}.{cuda.group(2)}." in global_args["CUDA_IMAGE"]
    base = image("base")
    assert any('"torch==$TORCH_VERSION"' in run and "$TORCH_INDEX" in run for run in base.runs())


def test_segment_anything_2_gets_the_matching_torchvision_and_sam2():
    sam = IMAGES["segment-anything-2"]
    major, minor, _ = pins(REPO_ROOT / "constraints.txt")["torch"].split(".")
    # torchvision 0.(N+15) is the release built for torch 2.N
    assert sam.args["TORCHVISION_VERSION"].split(".")[:2] == ["0", str(int(minor) + 15)]
    install = " ".join(sam.runs())
    assert '"torchvision==$TORCHVISION_VERSION"' in install and "$TORCH_INDEX" in install
    assert '"sam2==$SAM2_VERSION"' in install and "SAM2_BUILD_CUDA=0" in install
    assert all("torchvision" not in " ".join(img.runs())
               for name, img in IMAGES.items() if name != "segment-anything-2")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runtime_contract(name):
    img = IMAGES[name]
    assert img.expose == [str(PORT)]
    assert img.env["PORT"] == str(PORT) and img.env["HOST"] == "0.0.0.0"
    assert img.env["MODEL_DIR"] == "/models" and img.volumes == ["/models"]
    assert img.env["HF_HUB_OFFLINE"] == "1"
    assert img.env["PIPELINE"] in served(img)
    model_id = img.env["MODEL_ID"]
    assert model_id == "" or model_id in {e.id for e in REGISTRY.entries(img.env["PIPELINE"])}
    assert img.user and img.user not in ("root", "0") and not img.user.startswith("0:")
    assert any("useradd" in run and img.user in run for run in img.runs())
    assert img.healthcheck and re.search(r"http://127\.0\.0\.1:\$\{PORT\}/health\b",
                                         img.healthcheck)
    command = (img.entrypoint or []) + (img.cmd or [])
    assert command[-3:] == ["python", "-m", "runner"]


def healthy_pattern(check: str) -> re.Pattern:
    """The `grep -qE '...'` a health check pipes /health's body through."""
    (pattern,) = re.findall(r"grep -qE '([^']+)'", check.replace('\\"', '"'))
    return re.compile(pattern)


@pytest.mark.parametrize("check", [IMAGES["diffusion"].healthcheck,
                                   " ".join(COMPOSE_SPEC["x-runner"]["healthcheck"]["test"])])
def test_health_checks_take_every_status_but_error(check):
    pattern = healthy_pattern(check)
    for status in ("LOADING", "IDLE", "OK"):
        assert pattern.search(json.dumps({"status": status})), status
    assert not pattern.search(json.dumps({"status": "ERROR"}))


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_fit_go_livepeers_container_lifecycle(name):
    """/version compares as the contract version; a cold load fits the queue timeout; a stop
    finishes before go-livepeer's SIGKILL."""
    env = IMAGES[name].env
    assert env["VERSION"] == runner.wire_version()
    assert golivepeer.compatible(runner.CONTRACT_VERSION, env["VERSION"])
    assert float(env["QUEUE_TIMEOUT"]) >= golivepeer.CONTAINER_TIMEOUT
    assert int(env["SHUTDOWN_GRACE_SECONDS"]) + 2 < golivepeer.STOP_TIMEOUT


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_env_names_are_settings_or_known_variables(name):
    unknown = set(IMAGES[name].env) - KNOWN_ENV
    assert unknown == set(), f"{name} sets {unknown}: not a Settings field nor read by the code"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_env_values_are_valid_settings(name, monkeypatch):
    img = IMAGES[name]
    for key in SETTINGS_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in img.env.items():
        if key in SETTINGS_ENV:
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.device == "cuda"
    assert settings.port == PORT and str(settings.model_dir) == "/models"
    assert settings.pipeline_names(sorted(MODULES)) == [img.env["PIPELINE"]]


def test_the_llm_image_runs_ollama_beside_the_runner():
    llm = IMAGES["llm"]
    assert llm.entrypoint == ["/usr/local/bin/llm-entrypoint"]
    assert any("docker/llm-entrypoint.sh /usr/local/bin/llm-entrypoint" in c
               for c in llm.copies())
    assert any(c.startswith("--from=ollama /usr/bin/ollama") for c in llm.copies())
    from pipelines.llm import DEFAULT_OLLAMA_HOST

    assert llm.env["OLLAMA_HOST"] == DEFAULT_OLLAMA_HOST  # the daemon binds what the runner uses
    assert llm.env["OLLAMA_MODELS"].startswith(llm.env["MODEL_DIR"] + "/")
    assert llm.env["LLM_BACKEND"] == "ollama"
    concurrency = {e.max_concurrency for e in REGISTRY.entries("llm")}
    assert concurrency == {int(llm.env["OLLAMA_NUM_PARALLEL"])}
    assert all("OLLAMA" not in k for n, img in IMAGES.items() if n != "llm" for k in img.env)


def test_the_build_context_holds_what_the_images_copy():
    allowed = {line[1:].rstrip("/") for line in
               (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for img in IMAGES.values():
        for copy in img.copies():
            parts = [p for p in copy.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in copy.split()):
                continue
            for source in parts[:-1]:
                assert source == "." or source.split("/")[0] in allowed, source
                assert source == "." or (REPO_ROOT / source).exists(), source


def test_image_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("runner.device.shutil.which", lambda name: None)
    assert check_image.compile_error() == ("TORCH_COMPILE cannot work: "
                                           "no C compiler (gcc, clang or $CC)")
    assert check_image.pinned(REPO_ROOT / "constraints.txt", "torch") == "2.13.0"
    assert check_image.pinned(REPO_ROOT / "constraints.txt", "no-such-package") is None
    reqs = image_requirements.requirements(REPO_ROOT / "pyproject.toml", ["llm"])
    assert "fastapi>=0.115" in reqs and any(r.startswith("ollama") for r in reqs)
    with pytest.raises(SystemExit, match="unknown extras"):
        image_requirements.requirements(REPO_ROOT / "pyproject.toml", ["gpu-magic"])


def test_the_build_check_fails_on_a_runtime_import_the_image_lacks(tmp_path):
    """The class of defect that once shipped four images that exit at start (httpx, which
    runner/live.py imports, was only in the dev extra): the build-time check imports every
    runner module and builds the app for each served pipeline, so a missing import fails the
    build. Here httpx is shadowed by a module that cannot be imported."""
    (tmp_path / "httpx.py").write_text("raise ModuleNotFoundError(\"No module named 'httpx'\")")
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docker" / "check_image.py"), "--constraints",
         str(REPO_ROOT / "constraints.txt"), "image-to-text"],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    assert "runner.live does not import: ModuleNotFoundError" in done.stderr
    assert "the app cannot be built serving image-to-text" in done.stderr


def test_runtime_imports_are_declared_where_the_images_install_from():
    """Every third-party package that a runner/ module imports when it is imported (at the top
    level, as runner/live.py imports httpx) is a dependency of the project itself, which every
    image installs, not of an extra such as dev. Imports inside functions belong to the
    pipelines that use them (diffusers for the safety checker) and come with their extras."""
    import importlib.metadata as metadata

    declared = {canonicalize_name(Requirement(r).name)
                for r in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
                ["project"]["dependencies"]}
    distributions = metadata.packages_distributions()
    imported = set()
    for path in (REPO_ROOT / "runner").glob("*.py"):
        imported |= set(re.findall(r"^(?:from|import) ([a-zA-Z_][a-zA-Z0-9_]*)",
                                   path.read_text(), re.MULTILINE))
    third_party = {name for name in imported - set(sys.stdlib_module_names)
                   if name not in ("runner", "pipelines", "__future__")}
    undeclared = {}
    for name in third_party:
        dists = {canonicalize_name(d) for d in distributions.get(name, [name])}
        if not dists & declared and not any(d in declared_by(declared) for d in dists):
            undeclared[name] = sorted(dists)
    assert not undeclared, f"runner/ imports packages pyproject.toml does not depend on: " \
                           f"{undeclared}"


def declared_by(declared: set[str]) -> set[str]:
    """The declared dependencies and what they require in turn (fastapi brings starlette)."""
    import importlib.metadata as metadata

    seen, todo = set(), list(declared)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [canonicalize_name(Requirement(r).name) for r in requires
                 if "extra ==" not in r]
    return seen


# -- docker-bake.hcl -----------------------------------------------------------------------------

def test_bake_builds_every_image_with_family_version_tags():
    project_version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert VARIABLES["VERSION"] == runner.__version__ == project_version["version"]
    assert VARIABLES["REGISTRY"] == ""
    assert sorted(GROUPS["default"]) == sorted(IMAGES)
    for name in IMAGES:
        attrs = BAKE_TARGETS[name]
        assert attrs["target"] == name
        assert attrs["dockerfile"] == "docker/Dockerfile" and attrs["context"] == "."
        assert attrs["tags"] == [f"${{REGISTRY}}runner:{name}-${{VERSION}}"]
    assert set(bake_tags().values()) == set(IMAGES)
    # The runner's own version reaches /version as build metadata.
    (common,) = [body for kind, label, body in hcl_blocks(BAKE.read_text())
                 if kind == "target" and label == "_common"]
    assert re.search(r'RUNNER_VERSION\s*=\s*"\$\{VERSION\}"', common)
    assert IMAGES["diffusion"].env["VERSION"].endswith(f"+runner.{VARIABLES['VERSION']}")


# -- compose.yaml --------------------------------------------------------------------------------

def test_compose_services_run_real_pipelines_from_baked_images():
    tags = bake_tags()
    assert "llm" in SERVICES
    ports = []
    for name, service in SERVICES.items():
        env = service["environment"]
        target = tags.get(compose_value(service["image"]))
        assert target, f"{name}: {service['image']} is not built by docker-bake.hcl"
        assert env["PIPELINE"] in served(IMAGES[target]), f"{name}: {target} cannot serve it"
        assert env["MODEL_ID"] in {e.id for e in REGISTRY.entries(env["PIPELINE"])}
        assert set(env) <= KNOWN_ENV, name
        (port,) = service["ports"]
        host_ip, host_port, container_port = compose_value(port).split(":")
        assert host_ip == "127.0.0.1" and container_port == str(PORT)
        ports.append(host_port)
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert [compose_value(v).split(":")[1] for v in service["volumes"]] == ["/models"]
        test = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{PORT}/health" in test
    assert len(set(ports)) == len(ports)
    assert {SERVICES[s]["environment"]["PIPELINE"] for s in SERVICES} == set(MODULES)


def test_compose_env_values_are_valid_settings(monkeypatch):
    for name, service in SERVICES.items():
        for key in SETTINGS_ENV:
            monkeypatch.delenv(key, raising=False)
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, compose_value(str(value)))
        settings = Settings()
        assert settings.pipeline == service["environment"]["PIPELINE"], name


def test_the_cpu_override_runs_every_service_in_tiny_mode_without_a_gpu(monkeypatch):
    """compose.cpu.yaml merged over compose.yaml by podman-compose's own merge (the image check
    brings the set up this way): every service keeps its pipeline and model, drops the GPU
    reservation, and its settings say CPU and tiny mode; the llm runs its tiny model on
    transformers with an Ollama store it can write."""
    import podman_compose  # registers the !reset and !override tags with the safe loader

    cpu = yaml.safe_load(CPU_COMPOSE.read_text())
    merged = podman_compose.rec_merge({}, podman_compose.normalize(yaml.safe_load(
        COMPOSE.read_text())), podman_compose.normalize(cpu))["services"]
    assert set(merged) == set(SERVICES)
    for name, service in merged.items():
        assert "deploy" not in service, name
        env = {k: compose_value(str(v)) for k, v in service["environment"].items()}
        assert set(env) <= KNOWN_ENV | {"OMP_NUM_THREADS"}, name
        assert env["PIPELINE"] == SERVICES[name]["environment"]["PIPELINE"]
        assert env["MODEL_ID"] == SERVICES[name]["environment"]["MODEL_ID"]
        for key in SETTINGS_ENV:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert (settings.device, settings.tiny) == ("cpu", True), name
    llm = merged["llm"]["environment"]
    assert llm["LLM_BACKEND"] == "transformers" and llm["OLLAMA_MODELS"].startswith("/tmp/")


# -- go-livepeer examples ------------------------------------------------------------------------

def ai_models(name: str) -> list[dict]:
    """An example's entries, as go-livepeer's parser takes them (prices as JSON numbers, a
    currency in its own field; tests/support/golivepeer.py), and naming what the runner has."""
    golivepeer.parse_ai_models((EXAMPLES / name).read_text())
    entries = json.loads((EXAMPLES / name).read_text())
    assert isinstance(entries, list) and entries
    for entry in entries:
        assert set(entry) <= AI_MODEL_FIELDS, set(entry) - AI_MODEL_FIELDS
        assert entry["pipeline"] in REGISTRY.pipelines
        assert entry["model_id"] in {e.id for e in REGISTRY.entries(entry["pipeline"])}
        assert isinstance(entry.get("warm", False), bool)
        assert set(entry.get("optimization_flags", {})) <= set(OPTIMISATION_FLAGS)
        assert entry.get("currency", "USD") in ("USD", "wei", "ETH"), entry
    return entries


def test_managed_ai_models_cover_every_pipeline():
    entries = ai_models("aiModels.managed.json")
    assert {e["pipeline"] for e in entries} == set(MODULES)
    assert all("url" not in e and "token" not in e for e in entries)


def test_image_overrides_map_each_pipeline_to_the_image_that_serves_it():
    overrides = json.loads((EXAMPLES / "aiRunnerImageOverrides.json").read_text())
    assert set(overrides) <= {"default", "batch", "live"}
    tags = bake_tags()
    assert overrides["default"] in tags
    assert set(overrides["batch"]) == set(MODULES)  # go-livepeer's own choices would win
    for pipeline, tag in overrides["batch"].items():
        assert tag in tags, tag
        assert pipeline in served(IMAGES[tags[tag]]), f"{tag} does not serve {pipeline}"


def named_by(url: str, pipelines: list[str], model_id: str = "") -> tuple[str, views.View]:
    """The runner's port in an entry's url, and the pipeline and model that url's /version
    names (go-livepeer advertises a version only where they are the entry's): at the root a
    single-pipeline runner's PIPELINE and MODEL_ID, under /pipelines/ its view's."""
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/.*)?", url)
    assert match, url
    port, path = match.groups()
    if not path:
        assert len(pipelines) == 1 and model_id, url
        return port, views.View(pipelines[0], model_id)
    table = views.table(pipelines, REGISTRY)
    assert path in table, f"{url} is no base URL of a runner serving {pipelines}"
    return port, table[path]


def test_external_ai_models_point_at_compose_runners_of_their_pipeline():
    by_port = {compose_value(s["ports"][0]).split(":")[1]: s for s in SERVICES.values()}
    max_queue = Settings.model_fields["max_queue"].default
    for entry in ai_models("aiModels.external.json"):
        port = re.fullmatch(r"http://127\.0\.0\.1:(\d+).*", entry["url"]).group(1)
        service = by_port[port]
        env = service["environment"]
        assert env["PIPELINE"] == entry["pipeline"]
        assert named_by(entry["url"], [env["PIPELINE"]], env["MODEL_ID"])[1] == \
            views.View(entry["pipeline"], entry["model_id"])
        assert isinstance(entry["token"], str) and entry["token"]
        model = next(e for e in REGISTRY.entries(entry["pipeline"]) if e.id == entry["model_id"])
        assert 1 <= entry["capacity"] <= model.max_concurrency + max_queue


def test_a_multi_pipeline_runners_entries_each_name_their_own_pipeline_and_model():
    """aiModels.multi.json lists one runner (deploy.md's docker run) once per pipeline and
    model, each at the base URL whose /version names them."""
    entries = ai_models("aiModels.multi.json")
    served = list(dict.fromkeys(e["pipeline"] for e in entries))
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert f"PIPELINE={','.join(served)}" in doc
    named = [named_by(e["url"], served) for e in entries]
    assert len({port for port, _ in named}) == 1
    assert [view for _, view in named] == [views.View(e["pipeline"], e["model_id"])
                                           for e in entries]


def test_deploy_doc_names_every_example():
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    for path in EXAMPLES.iterdir():
        assert f"examples/{path.name}" in doc, path.name


# -- the llm entrypoint, against a fake daemon ---------------------------------------------------

FAKE_OLLAMA = """#!/bin/sh
exec "{python}" -c '
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["OLLAMA_HOST"].rsplit(":", 1)[1])), H)
server.timeout = 0.1
deadline = time.time() + float(os.environ["FAKE_LIFETIME"])
while time.time() < deadline and not os.path.exists(os.environ.get("FAKE_STOP", "")):
    server.handle_request()
sys.exit(7)
'
"""
# The fake daemon serves until the file FAKE_STOP names exists (the test's "it dies now"), or
# for FAKE_LIFETIME seconds, longer than any test needs it: it then exits 7.



@pytest.fixture
def fake_ollama(tmp_path):
    if shutil.which("bash") is None or shutil.which("curl") is None:
        pytest.skip("needs bash and curl")
    version = subprocess.run(["bash", "-c", "echo ${BASH_VERSINFO[0]}${BASH_VERSINFO[1]}"],
                             capture_output=True, text=True).stdout.strip()
    if int(version) < 51:
        pytest.skip("the entrypoint needs bash >= 5.1 (wait -n -p), as in the image")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ollama").write_text(FAKE_OLLAMA.format(python=sys.executable))
    (bin_dir / "ollama").chmod(0o755)

    def start(*command: str, background: bool = False, env: dict[str, str] | None = None):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "OLLAMA_HOST": f"http://127.0.0.1:{free_port()}",
               "OLLAMA_MODELS": str(tmp_path / "models" / "ollama"),
               "FAKE_LIFETIME": str(HANG_S), "FAKE_STOP": str(tmp_path / "daemon-dies"),
               **(env or {})}
        argv = ["bash", str(REPO_ROOT / "docker" / "llm-entrypoint.sh"), *command]
        if background:
            return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        return subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=2 * HANG_S)

    return start


def test_entrypoint_exits_with_the_commands_status(fake_ollama, tmp_path):
    done = fake_ollama("sh", "-c", "exit 3")
    assert done.returncode == 3
    assert "exited (status 3); stopping ollama serve" in done.stderr
    assert (tmp_path / "models" / "ollama").is_dir()


def test_entrypoint_stops_the_runner_when_the_daemon_dies(fake_ollama):
    """The command, once started, makes the daemon die (it used to live 1.5 s: a slow start
    outlived it); the entrypoint stops the command and exits with the daemon's status."""
    done = fake_ollama("sh", "-c", 'touch "$FAKE_STOP" && exec sleep 30')
    assert done.returncode == 7, done.stderr
    assert "ollama serve exited (status 7); stopping sh" in done.stderr


# A runner stand-in: on SIGTERM it counts the signals it gets, asks the daemon once more (a
# request in flight still needs it), and exits 0 as the runner does after a graceful shutdown.
GRACEFUL = """
on_term() { echo term >> "$SIGNALS"; }
trap on_term TERM
echo started > "$SIGNALS"
while [ "$(wc -l < "$SIGNALS")" -lt 2 ]; do sleep 0.1; done
sleep 0.5
curl -fsS --max-time 60 "$OLLAMA_HOST/api/version" > /dev/null || exit 9
exit 0
"""


def test_entrypoint_passes_sigterm_to_the_runner_once_and_exits_with_its_status(
        fake_ollama, tmp_path):
    """docker stop / go-livepeer's stop: the runner gets one SIGTERM (a second makes uvicorn
    drop requests in flight), the daemon stays up until the runner has finished, and the
    container exits 0 after the runner's graceful shutdown."""
    signals = tmp_path / "signals"
    proc = fake_ollama("bash", "-c", GRACEFUL, background=True,
                       env={"SIGNALS": str(signals)})
    while not (signals.exists() and signals.read_text().startswith("started")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=2 * HANG_S)
    assert proc.returncode == 0, err
    assert signals.read_text().split() == ["started", "term"]
    assert "stopping ollama serve" not in err


def test_the_image_checks_ollama_stand_in_serves_and_stops(tmp_path):
    """docker/standin/ollama, the `ollama` the image check builds the llm image with: `ollama
    serve` answers the daemon's liveness route on OLLAMA_HOST and exits 0 on SIGTERM."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "docker" / "standin" / "ollama"),
                             "serve"], env={**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert answer.status_code == 200 and answer.json()["version"].endswith("standin")
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags").json() == {"models": []}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    refused = subprocess.run([sys.executable, str(REPO_ROOT / "docker" / "standin" / "ollama"),
                              "pull", "llama3.1:8b"], capture_output=True, text=True)
    assert refused.returncode == 1 and "not supported" in refused.stderr


def test_entrypoint_refuses_a_model_store_it_cannot_write_in_one_line():
    """go-livepeer creates -aiModelsDir as its own user; the image runs as uid 1000. A store
    without write permission (as root: run as nobody, since root may write anywhere) is
    refused before the daemon starts, in one line that says how to fix it."""
    root = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        root.chmod(0o755)
        store = root / "models" / "ollama"
        store.mkdir(parents=True)
        store.chmod(0o555)
        script = root / "llm-entrypoint.sh"
        shutil.copy(REPO_ROOT / "docker" / "llm-entrypoint.sh", script)
        command = ["bash", str(script), "sh", "-c", "exit 3"]
        uid = os.getuid()
        if uid == 0:
            uid = 65534
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                       *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={
            **os.environ, "OLLAMA_MODELS": str(store),
            "OLLAMA_HOST": f"http://127.0.0.1:{free_port()}"})
        assert done.returncode == 1, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert f"OLLAMA_MODELS={store} is not writable by uid {uid}" in line
        assert f"chown -R {uid}:" in line
    finally:
        store.chmod(0o755)
        shutil.rmtree(root)
