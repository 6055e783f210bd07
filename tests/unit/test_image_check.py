"""scripts/image_check.py's own parts that need no podman: the targets it builds, the body check
it applies to each pipeline's answer, and the raw request it half-sends before SIGTERM. The
whole check runs in CI after the suites (`make image-check`)."""

from __future__ import annotations

import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import image_check  # noqa: E402

from runner.spec import discover  # noqa: E402

PIPELINES = sorted(discover(installed_only=False))


def test_it_builds_every_target_that_docker_bake_builds():
    bake = (ROOT / "docker-bake.hcl").read_text()
    group = re.search(r'group "default" \{\s*targets\s*=\s*\[([^\]]*)\]', bake).group(1)
    assert image_check.targets() == re.findall(r'"([^"]+)"', group)


def test_every_pipeline_has_a_sample_request_and_a_200_body_schema():
    contract = image_check.Contract()
    for pipeline in PIPELINES:
        call = image_check.sample_call(pipeline)
        assert call.path == f"/{pipeline}"
        assert contract.errors(call.path, 42), pipeline  # a schema that refuses a bare number


def test_the_body_check_takes_a_well_formed_answer_and_names_what_is_wrong():
    contract = image_check.Contract()
    good = {"images": [{"url": "data:image/png;base64,iVBORw0KGgo=", "seed": 1, "nsfw": False}]}
    assert contract.errors("/text-to-image", good) == []
    (problem,) = contract.errors("/text-to-image", {"images": [{"seed": 1, "nsfw": False}]})
    assert "'url' is a required property" in problem
    assert list(image_check.data_urls(good)) == [good["images"][0]["url"]]


class Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("pipeline", ["text-to-image", "audio-to-text", "segment-anything-2"])
def test_the_half_sent_request_is_whole_once_its_rest_follows(pipeline):
    """What the SIGTERM check sends in two parts is one well-framed request (JSON or multipart)
    that a server reads in full and answers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        head, body = image_check.raw_request(image_check.sample_call(pipeline), port)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body[:len(body) // 2])
            sock.sendall(body[len(body) // 2:])
            status, echoed = image_check.read_answer(sock)
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and echoed == body
