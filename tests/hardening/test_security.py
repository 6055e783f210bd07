"""Security: model and LoRA ids that try to leave MODEL_DIR, code that must never unpickle or
run remote code, the bearer token compare, and request bodies capped before parsing."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import hub, routes
from runner.app import create_app
from runner.settings import REPO_ROOT, Settings
from tests.conftest import LiveServer, echo_modules
from tests.hardening import support
from tests.hardening.strategies import HOSTILE_IDS
from tests.hardening.support import rejected
from tests.support import golivepeer
from tests.support.helpers import HANG_S

SOURCE_DIRS = ["runner", "pipelines", "scripts", "docker"]


def sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


# -- a record of what the process touches on disk -----------------------------------------------

class FileAudit:
    """Paths opened or listed while `active` (a process-wide audit hook; hooks cannot be
    removed, so one is installed once and switched on per test)."""

    EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove",
              "os.symlink", "os.chmod", "shutil.rmtree", "shutil.copyfile"}

    def __init__(self):
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if self.active and event in self.EVENTS and args:
            path = args[0]
            if isinstance(path, (str, bytes, os.PathLike)):
                self.paths.append(os.path.abspath(os.fsdecode(path)))

    def __enter__(self) -> FileAudit:
        self.paths = []
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False


AUDIT = FileAudit()


@pytest.fixture(scope="module")
def canary(hardening_dir) -> Path:
    """A model folder in the hub layout beside MODEL_DIR, not in it: nothing may reach it."""
    outside = hardening_dir.parent / "outside-model-dir"
    with hub.writing_snapshot(outside, "evil/lora") as folder:
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"not weights")
    return outside


def touched_outside(paths: list[str], model_dir: Path, canary: Path) -> list[str]:
    model_dir, canary = str(model_dir.resolve()), str(canary.resolve())
    parent = str(Path(model_dir).parent)
    bad = []
    for path in paths:
        real = os.path.realpath(path)
        if real.startswith(canary) or "passwd" in real or "win.ini" in real:
            bad.append(path)
        elif real.startswith(parent + os.sep) and not real.startswith(model_dir):
            bad.append(path)  # a sibling of MODEL_DIR
    return bad


def hostile_ids(canary: Path) -> list[str]:
    return [*HOSTILE_IDS, str(canary), f"{canary}/models--evil--lora", "../outside-model-dir",
            "../outside-model-dir/models--evil--lora", "evil/../../outside-model-dir",
            "models--evil--lora", "..\\outside-model-dir", "evil/lora/../../../x"]


# -- model ids -------------------------------------------------------------------------------------

ROUTE_FIELDS = {
    "/text-to-image": ("json", {"prompt": "x", "width": 64, "height": 64,
                                "num_inference_steps": 1}, "model_id"),
    "/llm": ("json", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, "model"),
    "/image-to-image": ("image", {"prompt": "x", "num_inference_steps": "1"}, "model_id"),
    "/image-to-video": ("image", {"width": "64", "height": "64", "num_inference_steps": "1"},
                        "model_id"),
    "/upscale": ("image", {"prompt": "x", "num_inference_steps": "1"}, "model_id"),
    "/image-to-text": ("image", {}, "model_id"),
    "/segment-anything-2": ("image", {"point_coords": "[[1,1]]", "point_labels": "[1]"},
                            "model_id"),
    "/audio-to-text": ("audio", {}, "model_id"),
    "/echo-image": ("image", {}, "model_id"),
}


def post(client, route: str, **extra):
    kind, fields, _ = ROUTE_FIELDS[route]
    if kind == "json":
        return client.post(route, json={**fields, **extra})
    part = ("image", ("a.png", support.noise_png(16, 16), "image/png")) if kind == "image" \
        else ("audio", ("a.wav", support.wav(support.tone(0.2)), "audio/wav"))
    data = {**fields, **{k: str(v) for k, v in extra.items()}}
    return client.post(route, data=data, files=[part])


@pytest.mark.parametrize("route", list(ROUTE_FIELDS))
def test_hostile_model_ids_are_422_and_touch_nothing_outside_model_dir(runner, canary, route,
                                                                       hardening_dir):
    field = ROUTE_FIELDS[route][2]
    with AUDIT:
        answers = [(i, post(runner, route, **{field: i})) for i in hostile_ids(canary)]
    for model_id, r in answers:
        support.check_answer(r, (route, model_id))
        if route == "/llm":  # go-livepeer's worker ignores a 422 there: a 400 naming the field
            msg = support.rejected(r, 400)
            assert msg.startswith(("model_id: ", "model: ")), (model_id, msg)
        else:
            assert r.status_code == 422, (model_id, r.status_code, r.text[:300])
            (item,) = r.json()["detail"]
            assert item["loc"][-1] in ("model_id", "model"), item
            msg = item["msg"]
        assert "serves" in msg or "Ollama tag" in msg, msg
    assert not touched_outside(AUDIT.paths, hardening_dir, canary)


def test_operator_routes_refuse_hostile_ids(runner, canary, hardening_dir):
    ids = ["%2e%2e/%2e%2e/etc/passwd", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "x%00y",
           "http:%2F%2F169.254.169.254", str(canary).lstrip("/"), "evil/lora"]
    with AUDIT:
        answers = [(i, action, runner.post(f"/models/{i}/{action}"))
                   for i in ids for action in ("load", "pin", "unload")]
    for model_id, action, r in answers:
        assert r.status_code in (404, 422), (model_id, action, r.status_code, r.text[:200])
        support.error_message(r)
    assert not touched_outside(AUDIT.paths, hardening_dir, canary)


# -- LoRA ids --------------------------------------------------------------------------------------

def test_the_audit_sees_a_read_outside_model_dir(canary, hardening_dir):
    """Guards the tests here against an audit hook that records nothing."""
    target = next(canary.rglob("*.safetensors"))
    with AUDIT:
        target.read_bytes()
    assert touched_outside(AUDIT.paths, hardening_dir, canary)


@pytest.mark.parametrize("route", ["/text-to-image", "/image-to-image"])
def test_hostile_lora_ids_are_400_and_touch_nothing_outside_model_dir(runner, canary, route,
                                                                      hardening_dir, monkeypatch):
    lookups: list[tuple[str, str]] = []
    original = hub.snapshot_download

    def recording(repo_id, cache_dir, **kwargs):
        lookups.append((repo_id, cache_dir))
        return original(repo_id=repo_id, cache_dir=cache_dir, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", recording)
    with AUDIT:
        answers = [(i, post(runner, route, loras=json.dumps({i: 1.0})))
                   for i in hostile_ids(canary)]
    for lora, r in answers:
        msg = rejected(r, 400)
        assert "not a model id" in msg or "not available on this runner" in msg, (lora, msg)
    assert not touched_outside(AUDIT.paths, hardening_dir, canary)
    # Only ids the hub code accepts reach a file lookup, and only in MODEL_DIR.
    assert lookups, "expected the valid-looking ids (models--evil--lora) to be looked up"
    for repo_id, cache_dir in lookups:
        assert hub.is_repo_id(repo_id) and Path(cache_dir) == hardening_dir, (repo_id, cache_dir)


class Payload:
    """Unpickling this creates `marker`: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_lora_is_never_unpickled(runner, hardening_dir, tmp_path):
    """A LoRA in MODEL_DIR whose only weights are a pickle (`pytorch_lora_weights.bin`) that
    would run code: diffusers loads it with weights_only=True, the request is a 400, and the
    code never runs."""
    marker = tmp_path / "pwned"
    with hub.writing_snapshot(hardening_dir, "evil/pickled-lora") as folder:
        torch.save({"unet.x.lora_A.weight": Payload(marker)},
                   folder / "pytorch_lora_weights.bin")
    r = post(runner, "/text-to-image", loras=json.dumps({"evil/pickled-lora": 1.0}))
    rejected(r, 400, "evil/pickled-lora")
    assert not marker.exists(), "unpickling a LoRA ran its code"
    # and the model still serves
    assert post(runner, "/text-to-image").status_code == 200


def test_a_real_model_folder_is_not_a_lora(runner):
    r = post(runner, "/text-to-image", loras=json.dumps({"SG161222/RealVisXL_V4.0_Lightning": 1}))
    rejected(r, 400, "LoRA")
    assert post(runner, "/text-to-image").status_code == 200


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(name=st.text(max_size=40) | st.sampled_from(HOSTILE_IDS)
       | st.from_regex(r"[A-Za-z0-9][\w.\-/\\:%~]{0,30}", fullmatch=True))
def test_a_repo_id_never_names_a_folder_outside_model_dir(name):
    """Any string the hub code accepts as a repo id maps to one folder right under
    MODEL_DIR; everything else is refused before a path is built."""
    model_dir = Path("/models")
    if not hub.is_repo_id(name):
        assert hub.find_snapshot(model_dir, name) is None
        return
    assert not any(c in name for c in ("\\", "\x00", ":", "%")) and ".." not in name
    folder = hub.repo_folder(model_dir, name)
    assert folder.parent == model_dir and os.path.normpath(folder) == str(folder), folder
    assert folder.name.startswith("models--") and "/" not in folder.name


# -- code that must never run remote code or unpickle ----------------------------------------------

def test_no_code_trusts_remote_code():
    pattern = re.compile(r"trust_remote_code\s*[=:]\s*(True|1|[\"']?true)", re.IGNORECASE)
    found = [f"{p.relative_to(REPO_ROOT)}:{n}" for p in sources()
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    found += [str(p) for p in (REPO_ROOT / "docker").rglob("*") if p.is_file()
              and pattern.search(p.read_text(errors="ignore"))]
    assert not found, f"trust_remote_code enabled at {found}"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_pickles_are_only_loaded_with_weights_only():
    """Every torch.load passes weights_only=True; nothing calls pickle, an unsafe yaml load,
    numpy with allow_pickle, eval/exec, or a shell."""
    problems = []
    for path in sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for call, name in _calls(tree):
            where = f"{path.relative_to(REPO_ROOT)}:{call.lineno} {ast.unparse(call)[:80]}"
            keywords = {k.arg: k.value for k in call.keywords}
            if name == "torch.load" or name.endswith(".torch.load"):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"torch.load without weights_only=True: {where}")
            if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load",
                        "joblib.load", "marshal.loads", "eval", "exec", "os.system"):
                problems.append(f"{name}: {where}")
            if name == "yaml.load" and not any(
                    "Safe" in ast.unparse(v) for v in keywords.values()):
                problems.append(f"yaml.load without a safe loader: {where}")
            if name in ("np.load", "numpy.load") and isinstance(
                    keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value:
                problems.append(f"np.load(allow_pickle=True): {where}")
            shell = keywords.get("shell")
            if isinstance(shell, ast.Constant) and shell.value:
                problems.append(f"shell=True: {where}")
    assert not problems, "\n".join(problems)


def test_the_torch_load_calls_were_seen():
    """Guards the test above against an AST walk that silently finds nothing."""
    loads = [(p, call) for p in sources() for call, name in _calls(ast.parse(p.read_text()))
             if name == "torch.load"]
    assert loads, "expected the SAM2 .pt loader's torch.load"


def test_the_sam2_yaml_may_not_instantiate_arbitrary_classes(tmp_path):
    pytest.importorskip("hydra")
    pytest.importorskip("omegaconf")
    from pipelines import segment_anything_2 as sam2
    from runner.errors import ModelLoadError

    marker = tmp_path / "pwned"
    config = f"model:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n"
    with pytest.raises(ModelLoadError, match="sam2 package"):
        sam2.official_model(config)
    assert not marker.exists()


# -- the bearer token ------------------------------------------------------------------------------

def test_the_token_is_compared_in_constant_time():
    source = inspect.getsource(routes.bearer_auth)
    assert "compare_digest" in source, source
    tree = ast.parse(source)
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in n.ops)
                and "token" in ast.unparse(n)]
    assert not [ast.unparse(c) for c in compares if "not token" not in ast.unparse(c)], source


@pytest.fixture(scope="module")
def secured(hardening_dir, models_file):
    """The echo and llm pipelines behind a token (the llm brings the OpenAI routes)."""
    from fastapi.testclient import TestClient

    from tests.conftest import wait_ready

    settings = Settings(pipeline="echo-image,llm", tiny=True, device="cpu",
                        tiny_dir=hardening_dir, models_file=models_file,
                        auth_token="s3cret", health_probe_seconds=0)
    with TestClient(create_app(settings, echo_modules()), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("header", [
    b"Bearer \xff\xfe", b"Bearer s3cret\xc3\xb8", b"Bearer " + b"A" * 8000, b"Bearer",
    b"bearer s3cre", b"Bearer s3cret\x00", b"Token s3cret", b"",
    b"Bearer s3cret, Bearer s3cret",
])
def test_odd_authorization_headers_are_401_not_500(secured, header):
    for method, path, kwargs in [
        ("POST", "/echo-image", {"files": {"image": ("a.png", support.noise_png(), "image/png")}}),
        ("POST", "/llm", {"json": {"messages": [{"role": "user", "content": "x"}]}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": [{"role": "user",
                                                                 "content": "x"}]}}),
        ("GET", "/v1/models", {}),
        ("POST", "/models/test/echo-a/load", {}),
    ]:
        r = secured.request(method, path, headers={"authorization": header}, **kwargs)
        rejected(r, 401, "token")
        assert r.headers["www-authenticate"] == "Bearer"


# -- request bodies capped before parsing ----------------------------------------------------------

CAP = 64 * 1024


@pytest.fixture(scope="module")
def capped(hardening_dir, models_file):
    """A live echo server with a 64 KiB body cap. Echo's model is tiny, so it is ready at
    once; the cap is enforced before any route runs."""
    settings = Settings(pipeline="echo-image", tiny=True, device="cpu", tiny_dir=hardening_dir,
                        models_file=models_file, max_upload_bytes=CAP, health_probe_seconds=0)
    with LiveServer(create_app(settings, echo_modules())) as server:
        yield server


def raw_request(server: LiveServer, head: bytes, body: bytes = b"", timeout: float = HANG_S,
                read_all: bool = False) -> tuple[int, bytes]:
    """Sends bytes on a socket; returns the status code and the response bytes (read until
    the answer is whole, the server closes, or `timeout` s pass: every caller expects an
    answer, so the limit only ends a hang)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head)
        try:
            if body:
                s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: what we want
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
            if not read_all and b"\r\n\r\n" in data:
                head_end = data.index(b"\r\n\r\n") + 4
                length = re.search(rb"content-length: (\d+)", data[:head_end], re.I)
                if length and len(data) >= head_end + int(length.group(1)):
                    break
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def oversize(path: str) -> int:
    """What an upload over the cap gets on a generate route: 413 where go-livepeer's client
    decodes it there, else the 400 it reads."""
    return 413 if 413 in golivepeer.decoded(path) else 400


def test_declared_length_over_the_cap_is_refused_before_the_body_is_sent(capped):
    head = (b"POST /echo-image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 10737418240\r\n\r\n")
    status, data = raw_request(capped, head)  # 10 GiB declared, nothing sent
    assert status == oversize("/echo-image") == 400, data[:300]
    assert "limit" in json_of(data)["detail"]["msg"]


@pytest.mark.parametrize("path, ctype", [
    ("/echo-image", b"multipart/form-data; boundary=b"), ("/echo-image", b"application/json"),
    ("/no-such-route", b"application/octet-stream"), ("/health", b"text/plain"),
])
def test_chunked_body_over_the_cap_is_refused(capped, path, ctype):
    head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 8192
    pieces = [piece] * (2 * CAP // 8192)
    if ctype.startswith(b"multipart/"):
        # A well-formed file part that runs past the cap: garbage from the first byte would let
        # the form parser refuse it (400) before the cap is reached, depending on timing.
        pieces.insert(0, b'--b\r\nContent-Disposition: form-data; name="image"; '
                         b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    status, data = raw_request(capped, head, body + b"0\r\n\r\n")
    if path == "/health":  # a GET route: POST is 405 whatever the body
        assert status in (405, 413), data[:300]
    elif path == "/no-such-route":
        assert status in (404, 413), data[:300]
    elif ctype == b"application/json":  # not the form this route reads: refused unread
        assert status in (oversize(path), 422), data[:300]
    else:
        assert status == oversize(path), data[:300]
        assert "limit" in json_of(data)["detail"]["msg"]


def test_lying_short_content_length_cannot_smuggle_a_second_request(capped):
    """Content-Length says 100, 200 KB follow: the server reads 100 bytes as the body and the
    rest is not a request; it answers the first, refuses the garbage, and keeps serving."""
    head = (b"POST /echo-image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100\r\n\r\n")
    status, data = raw_request(capped, head, b"y" * 200_000, read_all=True)
    assert status in (400, 422), data[:300]
    assert data.count(b"HTTP/1.1 200") == 0, data[:600]
    with capped.client() as http:
        assert http.get("/health").json()["status"] in ("OK", "IDLE", "LOADING")
        r = http.post("/echo-image", files={"image": ("a.png", support.noise_png(), "image/png")})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("declared", [b"abc", b"-1", b"1e9", b"+5", b" 5", b"99999999999999999999"])
def test_malformed_content_length_is_refused_at_the_door(capped, declared):
    head = (b"POST /echo-image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: " + declared + b"\r\n\r\n")
    status, data = raw_request(capped, head, b"z" * 10)
    assert status in (400, 413, 422), (declared, data[:300])


def asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """Drives the ASGI app directly, so the headers can say anything about the body."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict] = []
    read = 0

    async def receive():
        nonlocal read
        if read < len(messages):
            read += 1
            return messages[read - 1]
        await asyncio.sleep(3600)  # a client that never sends the rest

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), HANG_S))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, read


@pytest.mark.parametrize("declared", [b"10", b"", None, b"abc"])
@pytest.mark.parametrize("path, ctype", [
    ("/text-to-image", b"application/json"), ("/image-to-text", b"multipart/form-data; boundary=b"),
    ("/llm", b""), ("/audio-to-text", b"multipart/form-data; boundary=b"),
])
def test_a_lying_or_absent_content_length_never_gets_past_the_cap(runner, declared, path, ctype):
    """Behind a server or proxy that does not enforce Content-Length, the body is counted as
    it arrives: refused once it passes MAX_UPLOAD_BYTES (413 where the route's go-livepeer
    client decodes it, 400 elsewhere), the rest never read."""
    app = runner.app
    cap = int(app.state.service.settings.max_upload_bytes)
    piece = b"{" * (1 << 20)
    chunks = [piece] * (cap // len(piece) + 2) + [b"}"] * 1000
    if ctype.startswith(b"multipart/"):  # a well-formed part whose file never ends
        field = b"audio" if "audio" in path else b"image"
        chunks.insert(0, b'--b\r\nContent-Disposition: form-data; name="' + field
                      + b'"; filename="a"\r\nContent-Type: application/octet-stream\r\n\r\n')
    headers = [(b"host", b"x")] + ([(b"content-type", ctype)] if ctype else [])
    if declared is not None:
        headers.append((b"content-length", declared))
    status, body, read = asgi_post(app, path, headers, chunks)
    assert status == oversize(path), body[:300]
    assert "limit" in json.loads(body)["detail"]["msg"]
    assert read <= cap // len(piece) + 3, "kept reading after the cap"
