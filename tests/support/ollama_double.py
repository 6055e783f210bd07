"""An Ollama daemon double that speaks the real wire format (client 0.6.3, as measured in the
team's notes on tiny transformers models, section 5), for tests of the llm pipeline.

Two ways to reach it:
- `double.transport`: an httpx.MockTransport for `ollama.Client` / `ollama.AsyncClient`
  (no socket; whole responses at once);
- `with double.serve() as url`: a loopback HTTP/1.1 server (stdlib ThreadingHTTPServer on
  127.0.0.1:0) that writes NDJSON streams in chunks, `delay` seconds apart, and records a
  client that goes away mid-stream (`client_gone`).

Endpoints: POST /api/chat (streamed or not; an empty conversation loads the model, or unloads
it with keep_alive 0), GET /api/ps, POST /api/show, POST /api/pull (streamed progress), and
404 `{"error": "model \"x\" not found, try pulling it first"}` for a model it lacks.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

REPLY = "Hello! I am the Ollama double, and I answer one token at a time."
GIB = 1 << 30


@dataclass
class Reply:
    status: int
    objects: list[dict[str, Any]]  # one JSON object, or the lines of an NDJSON stream
    stream: bool = False


def tokens(text: str) -> list[str]:
    """Word-ish pieces, as a model streams them: `Hello`, `!`, ` I`, ` am`, ..."""
    return re.findall(r" ?\w+|[^\w\s]| ", text)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


def full(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"


class OllamaDouble:
    def __init__(self, models: tuple[str, ...] = ("llama3.1:8b",), pullable: tuple[str, ...] = (),
                 reply: str = REPLY, delay: float = 0.0, size_vram: int = 5 * GIB):
        self.models = {full(tag) for tag in models}  # what `ollama list` would show
        self.pullable = {full(tag) for tag in pullable}  # what the registry would give
        self.reply = reply
        self.delay = delay  # seconds between streamed lines (loopback server only)
        self.size_vram = size_vram
        self.loaded: dict[str, int] = {}  # model -> size_vram, as /api/ps shows it
        self.fail_after: int | None = None  # stream an {"error"} line after this many chunks
        self.die_after: int | None = None  # drop the connection after this many chunks
        self.down = False  # the mock transport refuses connections
        self.requests: list[tuple[str, str, dict]] = []
        self.chunks_sent = 0  # chat chunks written by the loopback server
        self.client_gone = threading.Event()  # the loopback server saw a client leave mid-stream
        self._lock = threading.Lock()

    def calls(self, path: str) -> list[dict]:
        with self._lock:
            return [body for _, p, body in self.requests if p == path]

    # -- the daemon ---------------------------------------------------------------------------
    def respond(self, method: str, path: str, body: dict) -> Reply:
        with self._lock:
            self.requests.append((method, path, body))
        if (method, path) == ("POST", "/api/chat"):
            return self.chat(body)
        if (method, path) == ("GET", "/api/ps"):
            return Reply(200, [self.ps()])
        if (method, path) == ("POST", "/api/show"):
            return self.show(body)
        if (method, path) == ("POST", "/api/pull"):
            return self.pull(body)
        if (method, path) == ("GET", "/api/version"):
            return Reply(200, [{"version": "0.12.0"}])
        return Reply(404, [{"error": "404 page not found"}])

    def not_found(self, model: str) -> Reply:
        return Reply(404, [{"error": f'model "{model}" not found, try pulling it first'}])

    def chat(self, body: dict) -> Reply:
        model = body.get("model", "")
        stream = body.get("stream", True)  # the daemon streams unless told not to
        if full(model) not in self.models:
            return self.not_found(model)
        base = {"model": model, "created_at": now()}
        empty = {"role": "assistant", "content": ""}
        if not body.get("messages"):
            if body.get("keep_alive") in (0, "0", "0s"):
                self.loaded.pop(full(model), None)
                reason = "unload"
            else:
                self.loaded[full(model)] = self.size_vram
                reason = "load"
            return Reply(200, [{**base, "message": empty, "done_reason": reason, "done": True}],
                         stream=stream)
        self.loaded[full(model)] = self.size_vram
        options = body.get("options") or {}
        pieces = tokens(self.reply)
        limit = int(options.get("num_predict", -1))
        length = 0 <= limit < len(pieces)
        pieces = pieces[:limit] if length else pieces
        prompt_tokens = sum(len(tokens(m.get("content", ""))) + 4 for m in body["messages"])
        final = {**base, "done": True, "done_reason": "length" if length else "stop",
                 "total_duration": 5_000_000, "load_duration": 1_000_000,
                 "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 1_000_000,
                 "eval_count": len(pieces), "eval_duration": 3_000_000}
        if not stream:
            return Reply(200, [{**final, "message": {"role": "assistant",
                                                     "content": "".join(pieces)}}])
        lines = [{**base, "message": {"role": "assistant", "content": p}, "done": False}
                 for p in pieces]
        if self.fail_after is not None:
            lines = lines[:self.fail_after] + [{"error": "an error was encountered while "
                                                         "running the model: GGML_ASSERT"}]
        else:
            lines.append({**final, "message": empty})
        return Reply(200, lines, stream=True)

    def ps(self) -> dict:
        return {"models": [{
            "name": model, "model": model, "size": size + GIB, "digest": "sha256:" + "0" * 64,
            "details": {"parent_model": "", "format": "gguf", "family": "llama",
                        "families": ["llama"], "parameter_size": "8.0B",
                        "quantization_level": "Q4_K_M"},
            "expires_at": "2318-01-01T00:00:00Z", "size_vram": size, "context_length": 4096,
        } for model, size in self.loaded.items()]}

    def show(self, body: dict) -> Reply:
        model = body.get("model", "")
        if full(model) not in self.models:
            return Reply(404, [{"error": f"model '{model}' not found"}])
        return Reply(200, [{
            "modelfile": f"FROM {model}\n", "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": {"parent_model": "", "format": "gguf", "family": "llama",
                        "families": ["llama"], "parameter_size": "8.0B",
                        "quantization_level": "Q4_K_M"},
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
            "capabilities": ["completion", "tools"], "modified_at": "2025-01-01T00:00:00Z",
        }])

    def pull(self, body: dict) -> Reply:
        model = full(body.get("model", ""))
        stream = body.get("stream", True)
        if model not in self.models and model not in self.pullable:
            error = {"error": "pull model manifest: file does not exist"}
            return Reply(200, [{"status": "pulling manifest"}, error], stream=True) if stream \
                else Reply(500, [error])
        self.models.add(model)
        digest = "sha256:" + "1" * 64
        lines = [{"status": "pulling manifest"},
                 {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 4096},
                 {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 4096,
                  "completed": 4096},
                 {"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                 {"status": "success"}]
        return Reply(200, lines, stream=True) if stream else Reply(200, [{"status": "success"}])

    # -- in-process: httpx.MockTransport -------------------------------------------------------
    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        body = json.loads(request.content) if request.content else {}
        reply = self.respond(request.method, request.url.path, body)
        if reply.stream and self.die_after is not None:
            return httpx.Response(reply.status, content=self.dying(reply, request),
                                  headers={"content-type": "application/x-ndjson"})
        if reply.stream:
            content = b"".join(json.dumps(o).encode() + b"\n" for o in reply.objects)
            return httpx.Response(reply.status, content=content,
                                  headers={"content-type": "application/x-ndjson"})
        return httpx.Response(reply.status, json=reply.objects[0])

    async def dying(self, reply: Reply, request: httpx.Request) -> AsyncIterator[bytes]:
        """The daemon crashing mid-answer: some lines, then the connection is gone."""
        for line in reply.objects[:self.die_after]:
            yield json.dumps(line).encode() + b"\n"
        raise httpx.RemoteProtocolError("peer closed connection without sending complete "
                                        "message body", request=request)

    # -- over a socket: a loopback HTTP server -------------------------------------------------
    @contextmanager
    def serve(self) -> Iterator[str]:
        """A loopback daemon at the yielded URL, until the block ends."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.double = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True, name="ollama-double")
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streams and keep-alive, as the daemon does

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def serve(self, method: str) -> None:
        double: OllamaDouble = self.server.double  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        reply = double.respond(method, self.path, body)
        if not reply.stream:
            data = json.dumps(reply.objects[0]).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, obj in enumerate(reply.objects):
            if i and double.delay:
                time.sleep(double.delay)
            line = json.dumps(obj).encode() + b"\n"
            try:
                if self.peer_closed():
                    raise ConnectionResetError("the client closed the connection")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            except OSError:
                double.client_gone.set()
                self.close_connection = True
                return
            if self.path == "/api/chat":
                double.chunks_sent += 1
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def peer_closed(self) -> bool:
        """During a response the client sends nothing: a readable socket means it closed."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
