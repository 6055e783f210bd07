"""The image check: every target of docker/Dockerfile built, started as go-livepeer starts it,
and answered, on a machine with no Docker daemon that reaches only Debian's mirror and PyPI.

    scripts/image_check.sh [--targets diffusion,llm] [--no-build] [--no-compose] [--keep]

1. podman's engine settings (docker/standin/containers.conf) and stand-ins for the two images
   the Dockerfile takes from registries out of reach: the CUDA base (a Debian made by
   mmdebstrap) and the `ollama/ollama` stage (docker/standin/Containerfile.ollama).
2. Each target built with `--format docker` (the OCI format drops HEALTHCHECK), timed.
3. Each image: nothing left from its build (files in /tmp or /build, root's caches, a
   torchinductor cache anywhere).
4. Each pipeline it serves (its label org.livepeer.runner.pipelines), in a container started
   as go-livepeer starts one (PIPELINE, MODEL_ID, /models, port 8000), in CPU tiny mode, with
   a read-only root, a tmpfs /tmp and /models read-only: /health reaches IDLE, every process
   runs as uid 1000, the image's own HEALTHCHECK passes, and the pipeline's sample request is
   answered 200 with a body that the runner's openapi.yaml describes.
5. The image's default pipeline gets SIGTERM with a request in flight (its body half sent):
   the request is answered 200 and the container exits 0 within 8 s, go-livepeer's limit.
6. Tiny mode off and the default model missing from /models: the container exits non-zero
   with the download command in its log, once (no ERROR loop).
7. compose.yaml with compose.cpu.yaml (podman-compose): every service IDLE.
8. Each image's size, its layers' sizes, and all of them with shared layers counted once.

Exit 0 when every check passed. What it cannot show: the real CUDA base, NVIDIA's container
toolkit, a GPU (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from _common import ROOT, Registry, free_port, health_status  # puts the repo on sys.path
from bench_inputs import Call, Options, defaults, request
from jsonschema import Draft202012Validator
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012

import runner

DOCKERFILE = ROOT / "docker" / "Dockerfile"
STANDIN = ROOT / "docker" / "standin"
BASE_TAG = "localhost/runner-standin-base:bookworm"
PIPELINES_LABEL = "org.livepeer.runner.pipelines"
STANDIN_LABEL = "org.livepeer.runner.standin"
# go-livepeer's stop: SIGTERM, then SIGKILL 8 s later (ai/worker/docker.go).
STOP_LIMIT_S = 8.0
# Limits many times what each step takes on a quiet 2-core machine (a start ~20 s, a tiny
# request < 2 s): they only end a check that would otherwise hang.
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 600.0
EXIT_TIMEOUT_S = 300.0


# -- podman --------------------------------------------------------------------------------------

def engine_env() -> dict[str, str]:
    """podman's environment: the stand-in engine settings unless the caller set their own."""
    return {"CONTAINERS_CONF": str(STANDIN / "containers.conf"), **os.environ}


def podman(*args: str, check: bool = True, timeout: float | None = None,
           log: Path | None = None, merge: bool = False) -> subprocess.CompletedProcess[str]:
    """`podman ARGS`, its stdout captured (podman's own notices go to stderr; `merge` keeps
    both in order, as a container's log needs) or both written to `log`. A failure raises
    with the output's tail when `check`."""
    if log is None:
        done = subprocess.run(["podman", *args], env=engine_env(), text=True, timeout=timeout,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if merge else subprocess.PIPE)
        said = done.stdout + (done.stderr or "")
    else:
        with open(log, "w") as out:
            done = subprocess.run(["podman", *args], env=engine_env(), text=True,
                                  timeout=timeout, stdout=out, stderr=subprocess.STDOUT)
        said = log.read_text()
    if check and done.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n"
                          f"{tail(said)}")
    return done


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def inspect(kind: str, name: str) -> dict[str, Any]:
    return json.loads(podman(kind, "inspect", name).stdout)[0]


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class CheckFailed(Exception):
    """A check's failure: its message is what the report prints."""


# -- the report ----------------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def check(self, subject: str, name: str, fn: Callable[[], str]) -> bool:
        """Run one check, print and record its outcome; a failure does not stop the others."""
        started = time.monotonic()
        try:
            detail, ok = fn(), True
        except (CheckFailed, httpx.HTTPError, OSError, subprocess.TimeoutExpired) as exc:
            detail, ok = str(exc), False
        took = time.monotonic() - started
        self.rows.append((subject, name, ok, detail))
        mark = "ok  " if ok else "FAIL"
        print(f"[{mark}] {subject}: {name} ({took:.1f} s){': ' + detail if detail else ''}",
              flush=True)
        return ok

    @property
    def failed(self) -> list[tuple[str, str, bool, str]]:
        return [row for row in self.rows if not row[2]]


# -- 1. stand-ins --------------------------------------------------------------------------------

def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"docker/Dockerfile declares no ARG {name}")
    return match.group(1)


def targets() -> list[str]:
    """The Dockerfile's targets: the stages built FROM base."""
    return re.findall(r"^FROM base AS (\S+)", DOCKERFILE.read_text(), re.MULTILINE)


def standin_base(work: Path) -> str:
    """A Debian bookworm in place of the CUDA base, made once: the host's extra certificate
    authorities go in (a TLS-intercepting proxy's, where there is one), so pip reaches PyPI."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    tar = work / "base.tar"
    hook = ('mkdir -p "$1/usr/local/share/ca-certificates" && '
            'for f in /usr/local/share/ca-certificates/*.crt; do '
            '[ -e "$f" ] && cp "$f" "$1/usr/local/share/ca-certificates/"; done; true')
    subprocess.run(["mmdebstrap", "--variant=minbase", "--format=tar",
                    f"--customize-hook={hook}", "bookworm", str(tar)], check=True,
                   stdout=subprocess.DEVNULL)
    podman("import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
           "--change", 'CMD ["bash"]', str(tar), BASE_TAG)
    tar.unlink()
    return BASE_TAG


def standin_ollama() -> str:
    """The local image the Dockerfile's `ollama/ollama` stage resolves to; a real one that is
    already here (it has no stand-in label) is kept."""
    tag = f"docker.io/ollama/ollama:{dockerfile_arg('OLLAMA_VERSION')}"
    if image_exists(tag) and STANDIN_LABEL not in (inspect("image", tag)["Config"].get("Labels")
                                                   or {}):
        return tag
    podman("build", "--format", "docker", "-f", str(STANDIN / "Containerfile.ollama"),
           "-t", tag, str(STANDIN))
    return tag


# -- 2. builds -----------------------------------------------------------------------------------

def image_tag(target: str) -> str:
    return f"localhost/runner:{target}-{runner.__version__}"


def build(target: str, base: str, work: Path) -> str:
    log = work / f"build-{target}.log"
    started = time.monotonic()
    podman("build", "--format", "docker", "-f", str(DOCKERFILE), "--target", target,
           "--build-arg", f"CUDA_IMAGE={base}", "--build-arg", "TORCH_INDEX=https://pypi.org/simple",
           "-t", image_tag(target), str(ROOT), log=log)
    return f"{time.monotonic() - started:.0f} s (log: {log})"


# -- 3. a clean image ----------------------------------------------------------------------------

LEFTOVERS = ("find /tmp /build /root/.cache /root/.triton /home/runner/.cache -mindepth 1 "
             "-maxdepth 1 2>/dev/null; find / -xdev -name 'torchinductor*' 2>/dev/null; true")


def clean(tag: str) -> str:
    found = podman("run", "--rm", "--no-healthcheck", "--user", "0", "--entrypoint", "sh", tag,
                   "-c", LEFTOVERS).stdout.split()
    if found:
        raise CheckFailed(f"left from the build: {', '.join(found[:10])}")
    return ""


# -- 4. serving ----------------------------------------------------------------------------------

@dataclass
class Container:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, Any]:
        return inspect("container", self.name)["State"]

    def logs(self) -> str:
        return podman("logs", self.name, check=False, merge=True).stdout

    def wait(self) -> str:
        """Its exit status, once it has exited."""
        return podman("wait", self.name, timeout=EXIT_TIMEOUT_S).stdout.strip().splitlines()[-1]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def mounts(tag: str, models: Path, store: Path) -> list[str]:
    """/models read-only; an image that keeps an Ollama store under it (OLLAMA_MODELS, the llm
    image) gets that one folder writable (docs/deploy.md), and only that folder."""
    args = ["-v", f"{models}:/models:ro"]
    if (ollama := image_env(tag).get("OLLAMA_MODELS", "")).startswith("/models/"):
        args += ["-v", f"{store}:{ollama}"]
    return args


def tiny_env(tag: str, pipeline: str) -> list[str]:
    """go-livepeer's PIPELINE and MODEL_ID, and the CPU tiny mode. An image that picks an LLM
    backend (LLM_BACKEND=ollama) serves its tiny model on transformers; its daemon still runs."""
    env = {"PIPELINE": pipeline, "MODEL_ID": default_model(pipeline), "DEVICE": "cpu",
           "TINY": "1", "OMP_NUM_THREADS": "1"}
    if "LLM_BACKEND" in image_env(tag):
        env["LLM_BACKEND"] = "transformers"
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


@functools.cache
def image_config(tag: str) -> dict[str, Any]:
    """The image's configuration, read once: every build is done before any image is checked."""
    return inspect("image", tag)["Config"]


def image_env(tag: str) -> dict[str, str]:
    return dict(e.split("=", 1) for e in image_config(tag)["Env"])


@functools.cache
def registry() -> Registry:
    return Registry.load(ROOT / "models.yaml")


def default_model(pipeline: str) -> str:
    return registry().default(pipeline).id


@contextmanager
def started(name: str, tag: str, args: list[str], keep: bool) -> Iterator[Container]:
    """A detached container on a free loopback port, removed on leaving unless `keep`."""
    box = Container(name, free_port())
    box.remove()
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{box.port}:8000", "--read-only",
           "--tmpfs", "/tmp", *args, tag)
    try:
        yield box
    finally:
        if not keep:
            box.remove()


def wait_idle(box: Container) -> str:
    started_at = time.monotonic()
    while time.monotonic() - started_at < START_TIMEOUT_S:
        status = health_status(box.url)
        if status == "IDLE":
            return f"IDLE after {time.monotonic() - started_at:.0f} s"
        if status == "ERROR" or not box.state()["Running"]:
            raise CheckFailed(f"/health {status}, container "
                              f"{'running' if box.state()['Running'] else 'exited'}:\n"
                              f"{tail(box.logs())}")
        time.sleep(0.5)
    raise CheckFailed(f"not IDLE within {START_TIMEOUT_S:.0f} s:\n{tail(box.logs())}")


def runs_as_runner(box: Container) -> str:
    """Every process in the container (the exec'd one too, as the image's USER) has uid 1000
    as its real, effective, saved and filesystem uid."""
    out = podman("exec", box.name, "sh", "-c",
                 "grep -h '^Uid:' /proc/[0-9]*/status").stdout
    uids = {tuple(line.split()[1:]) for line in out.splitlines() if line.startswith("Uid:")}
    if uids != {("1000",) * 4}:
        raise CheckFailed(f"process uids {sorted(uids)}, not all 1000")
    return f"{len(out.splitlines())} processes as uid 1000"


def healthcheck(box: Container) -> str:
    done = podman("healthcheck", "run", box.name, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"the image's HEALTHCHECK failed: {done.stdout.strip()}")
    return ""


class Contract:
    """The runner's published openapi.yaml: each route's 200 body schema."""

    def __init__(self) -> None:
        self.doc = yaml.safe_load((ROOT / "openapi.yaml").read_text())
        self.registry = SchemaRegistry().with_resource(
            "urn:runner", Resource.from_contents(self.doc, default_specification=DRAFT202012))

    def errors(self, path: str, body: Any) -> list[str]:
        pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in (
            "paths", path, "post", "responses", "200", "content", "application/json", "schema"))
        validator = Draft202012Validator({"$ref": f"urn:runner#/{pointer}"},
                                         registry=self.registry)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]


def data_urls(body: Any) -> Iterator[str]:
    if isinstance(body, dict):
        for value in body.values():
            yield from data_urls(value)
    elif isinstance(body, list):
        for value in body:
            yield from data_urls(value)
    elif isinstance(body, str) and body.startswith("data:"):
        yield body


def sample_call(pipeline: str) -> Call:
    return request(pipeline, defaults(Options(), pipeline, tiny=True))


def answers(box: Container, pipeline: str, contract: Contract) -> str:
    """The pipeline's sample request (its own sample_request hook, at tiny sizes) answered 200
    with a body the contract describes, and every data URL in it decodes to bytes."""
    call = sample_call(pipeline)
    with httpx.Client(base_url=box.url, timeout=REQUEST_TIMEOUT_S) as client:
        answer = call.send(client)
    if answer.status_code != 200:
        raise CheckFailed(f"{call.path} answered {answer.status_code}: {answer.text[:500]}")
    body = answer.json()
    if problems := contract.errors(call.path, body):
        raise CheckFailed(f"{call.path} body does not match openapi.yaml: {problems[:5]}")
    urls = list(data_urls(body))
    for url in urls:
        if not base64.b64decode(url.partition(",")[2], validate=True):
            raise CheckFailed(f"{call.path} returned an empty data URL")
    return f"{call.path} 200, {len(answer.content)} bytes, {len(urls)} media"


# -- 5. SIGTERM with a request in flight ---------------------------------------------------------

def raw_request(call: Call, port: int) -> tuple[bytes, bytes]:
    """The request's head and body as an HTTP client sends them."""
    built = httpx.Client().build_request(
        "POST", f"http://127.0.0.1:{port}{call.path}",
        **({"json": call.json} if call.json is not None else
           {"data": call.data, "files": call.files}))
    body = built.read()
    headers = {**built.headers, "content-length": str(len(body)), "connection": "close"}
    head = f"POST {call.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                      headers.items()) + "\r\n"
    return head.encode(), body


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        raise CheckFailed("no answer: the connection closed without one")
    return int(head.split()[1]), body


def drain_began(box: Container) -> bool:
    """/ready says DRAINING, or the port no longer takes connections: the runner has the
    signal."""
    try:
        answer = httpx.get(box.url + "/ready", timeout=2)
    except httpx.HTTPError:
        return True
    return answer.status_code == 503 and "DRAINING" in answer.text


def stops_gracefully(box: Container, pipeline: str) -> str:
    """A request whose body is half sent is in flight (/health says OK); SIGTERM; once the
    runner drains, the rest of the body goes: the answer is 200, the exit 0, within 8 s."""
    head, body = raw_request(sample_call(pipeline), box.port)
    with socket.create_connection(("127.0.0.1", box.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head + body[:len(body) // 2])
        until(lambda: health_status(box.url) == "OK", "the request in flight (/health OK)")
        signalled = time.monotonic()
        podman("kill", "--signal", "TERM", box.name)
        until(lambda: drain_began(box), "the runner to begin draining", limit=STOP_LIMIT_S)
        sock.sendall(body[len(body) // 2:])
        status, answer = read_answer(sock)
        answered = time.monotonic() - signalled
    code = box.wait()
    exited = time.monotonic() - signalled
    if status != 200:
        raise CheckFailed(f"the request in flight was answered {status}: {answer[:300]!r}")
    if code != "0" or exited > STOP_LIMIT_S:
        raise CheckFailed(f"exit {code} {exited:.1f} s after SIGTERM (want 0 within "
                          f"{STOP_LIMIT_S:.0f} s):\n{tail(box.logs())}")
    return f"answered 200 {answered:.1f} s and exited 0 {exited:.1f} s after SIGTERM"


def until(condition: Callable[[], bool], what: str, limit: float = START_TIMEOUT_S,
          poll: float = 0.05) -> None:
    started_at = time.monotonic()
    while not condition():
        if time.monotonic() - started_at > limit:
            raise CheckFailed(f"waited {limit:.0f} s for {what}")
        time.sleep(poll)


# -- 6. no models, tiny mode off -----------------------------------------------------------------

def refuses_without_models(tag: str, target: str, models: Path, store: Path) -> str:
    """Started exactly as go-livepeer starts it (PIPELINE and MODEL_ID, the image's own
    DEVICE=cuda, tiny mode off) on a node whose /models lacks the default model: it exits
    non-zero, once, with the download command in its log. It checks the files before it
    touches a GPU, so this machine's lack of one does not change the answer."""
    pipeline = image_env(tag)["PIPELINE"]
    with started(f"image-check-{target}-no-models", tag,
                 [*mounts(tag, models, store), "-e", f"PIPELINE={pipeline}",
                  "-e", f"MODEL_ID={default_model(pipeline)}"], keep=False) as box:
        code, log = box.wait(), box.logs()
        restarts = inspect("container", box.name)["RestartCount"]
    if code == "0":
        raise CheckFailed(f"exited 0 without its model:\n{tail(log)}")
    if "scripts/download_models.py" not in log:
        raise CheckFailed(f"exit {code}, but no download command in the log:\n{tail(log)}")
    errors = sum(" ERROR " in line for line in log.splitlines())
    if errors > 1 or restarts:
        raise CheckFailed(f"{errors} ERROR lines, {restarts} restarts:\n{tail(log)}")
    command = next(line.strip() for line in log.splitlines() if "download_models.py" in line)
    return f"exit {code}: {command}"


# -- 7. compose ----------------------------------------------------------------------------------

COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml")


def compose(*args: str, env: dict[str, str], log: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    files = [arg for name in COMPOSE_FILES for arg in ("-f", str(ROOT / name))]
    command = [sys.executable, "-m", "podman_compose", *files, "--profile", "more", *args]
    with open(log, "a") if log else tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(command, env={**engine_env(), **env}, text=True, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"podman-compose {' '.join(args)} exited {done.returncode}"
                          + (f" (log: {log})" if log else ""))
    return done


def compose_ports() -> dict[str, int]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return {name: int(service["ports"][0].split(":")[1])
            for name, service in doc["services"].items()}


def compose_idle(work: Path) -> str:
    """compose.yaml and its CPU override up, every service IDLE, then down."""
    models = work / "compose-models"
    models.mkdir(exist_ok=True)
    env = {"MODEL_DIR": str(models), "VERSION": runner.__version__}
    log = work / "compose.log"
    log.write_text("")
    started_at = time.monotonic()
    compose("up", "-d", env=env, log=log, timeout=EXIT_TIMEOUT_S)
    try:
        waiting = compose_ports()
        while waiting and time.monotonic() - started_at < START_TIMEOUT_S:
            for name, port in list(waiting.items()):
                status = health_status(f"http://127.0.0.1:{port}")
                if status == "IDLE":
                    del waiting[name]
                elif status == "ERROR":
                    raise CheckFailed(f"{name} says ERROR")
            time.sleep(1)
        if waiting:
            raise CheckFailed(f"not IDLE within {START_TIMEOUT_S:.0f} s: {sorted(waiting)}")
        took = time.monotonic() - started_at
    finally:
        compose("down", "-t", "10", env=env, log=log, timeout=EXIT_TIMEOUT_S)
    return f"{len(compose_ports())} services IDLE after {took:.0f} s"


# -- 8. sizes ------------------------------------------------------------------------------------

@dataclass
class Layer:
    digest: str
    size: int
    created_by: str


def layers(tag: str) -> list[Layer]:
    """The image's layers, base first: its history entries that added files (an instruction
    that only sets metadata has size 0), each with the digest of its content, so a layer two
    images share counts once."""
    diff_ids = inspect("image", tag)["RootFS"]["Layers"]
    history = [h for h in reversed(json.loads(
        podman("history", "--format", "json", "--no-trunc", tag).stdout)) if h["size"] > 0]
    if len(history) != len(diff_ids):
        raise CheckFailed(f"{tag}: {len(diff_ids)} layers but {len(history)} history entries "
                          "with files")
    return [Layer(digest, h["size"], h.get("CreatedBy", ""))
            for digest, h in zip(diff_ids, history, strict=True)]


def mib(size: int) -> str:
    if size < 1 << 20:
        return f"{size / 1024:,.0f} KiB"
    return f"{size / (1 << 20):,.0f} MiB"


def sizes(tags: list[str]) -> str:
    lines, union = [], {}
    for tag in tags:
        found = layers(tag)
        union.update((layer.digest, layer.size) for layer in found)
        lines.append(f"{tag}: {mib(sum(layer.size for layer in found))} in {len(found)} layers")
        lines += [f"    {mib(layer.size):>10}  {short(layer.created_by)}" for layer in found]
    lines.append(f"all {len(tags)} images, shared layers counted once: {mib(sum(union.values()))}")
    return "\n".join(lines)


def short(created_by: str) -> str:
    """An instruction as the Dockerfile says it, without the build arguments and shell that
    the history prefixes it with."""
    text = re.sub(r"^\|\d+ (\S+=\S* )*", "", created_by.strip())
    text = re.sub(r"\s+", " ", text.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", ""))
    return text[:100] + ("..." if len(text) > 100 else "")


# -- the whole check -----------------------------------------------------------------------------

def check_image(target: str, report: Report, work: Path, contract: Contract,
                keep: bool) -> None:
    tag = image_tag(target)
    report.check(target, "nothing left from the build", lambda: clean(tag))
    served = image_config(tag)["Labels"][PIPELINES_LABEL].split(",")
    models, store = work / "models", work / "ollama-store"
    default = image_env(tag)["PIPELINE"]
    for pipeline in served:
        with started(f"image-check-{pipeline}", tag, mounts(tag, models, store)
                     + tiny_env(tag, pipeline), keep) as box:
            subject = f"{target}/{pipeline}"
            if not report.check(subject, "/health IDLE", lambda box=box: wait_idle(box)):
                continue
            report.check(subject, "runs as uid 1000", lambda box=box: runs_as_runner(box))
            report.check(subject, "HEALTHCHECK", lambda box=box: healthcheck(box))
            report.check(subject, "answers its sample request",
                         lambda box=box, p=pipeline: answers(box, p, contract))
            if pipeline == default:
                report.check(subject, "SIGTERM with a request in flight",
                             lambda box=box, p=pipeline: stops_gracefully(box, p))
    report.check(target, "no models, tiny off: exits with the download command",
                 lambda: refuses_without_models(tag, target, models, store))


def prepare(work: Path) -> None:
    """The model folders the containers mount: empty, readable by uid 1000; the llm image's
    Ollama store owned by it."""
    for folder in (work / "models", work / "ollama-store"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        folder.chmod(0o755)
    (work / "models" / "ollama").mkdir()  # the mount point of the store inside /models
    os.chown(work / "ollama-store", 1000, 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(targets()),
                        help="comma list of Dockerfile targets (default: all)")
    parser.add_argument("--no-build", action="store_true", help="check the images already built")
    parser.add_argument("--no-compose", action="store_true",
                        help="skip the compose check (it runs only when every target is built)")
    parser.add_argument("--keep", action="store_true", help="leave the serving containers")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "image-check",
                        help="build logs and the mounted model folders")
    args = parser.parse_args()
    chosen = args.targets.split(",")
    if unknown := sorted(set(chosen) - set(targets())):
        raise SystemExit(f"unknown targets {unknown}; docker/Dockerfile has {targets()}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.work.chmod(0o755)
    prepare(args.work)
    report, contract = Report(), Contract()
    started_at = time.monotonic()

    built = chosen
    if not args.no_build:
        base = standin_base(args.work)
        report.check("ollama/ollama", "stand-in image", standin_ollama)
        built = [t for t in chosen
                 if report.check(t, "build", lambda t=t: build(t, base, args.work))]
    for target in built:
        check_image(target, report, args.work, contract, args.keep)
    if not args.no_compose and set(built) == set(targets()):
        report.check("compose", "every service IDLE (compose.cpu.yaml)",
                     lambda: compose_idle(args.work))
    if built:
        report.check("images", "sizes", lambda: "\n" + sizes([image_tag(t) for t in built]))

    print(f"\nimage check: {len(report.rows) - len(report.failed)} passed, "
          f"{len(report.failed)} failed in {time.monotonic() - started_at:.0f} s")
    for subject, name, _, detail in report.failed:
        print(f"  FAILED {subject}: {name}: {detail.splitlines()[0] if detail else ''}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
