"""The llm pipeline through the HTTP app: the transformers backend on a tiny random-weight chat
model (CPU tiny mode), the Ollama backend against an in-process double through the real
`ollama` client, streaming, validation, and a client that goes away mid-stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pipelines import llm
from runner.app import create_app
from runner.settings import Settings
from tests.conftest import serving, wait_ready
from tests.support import golivepeer
from tests.support.contract import assert_valid
from tests.support.helpers import HANG_S, daemon_vram, free_port, wait_until
from tests.support.ollama_double import REPLY, OllamaDouble, tokens

DEFAULT = "meta-llama/Meta-Llama-3.1-8B-Instruct"
HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields) -> dict:
    return {"messages": HELLO, **fields}


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data:"):].strip() for line in text.splitlines() if line.startswith("data:")]


def check_stream(text: str) -> list[dict]:
    """Every data line before [DONE] is a valid LLMResponse chunk with one id, a cumulative
    usage that never goes down, and a finish_reason only on the last; returns the chunks."""
    data = sse_data(text)
    assert data and data[-1] == "[DONE]", data[-3:]
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks
    for chunk in chunks:
        assert_valid(chunk, "LLMResponse")
        assert chunk["choices"][0]["delta"]["role"] == "assistant"
        usage = chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    totals = [c["usage"]["completion_tokens"] for c in chunks]
    assert totals == sorted(totals)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return chunks


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"]["content"] for c in chunks)


# -- the transformers backend, tiny mode ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Iterator[TestClient]:
    with serving("llm", tmp_path_factory.getbasetemp() / "tiny-models-llm") as client:
        yield client


def test_chat_completion(tiny_llm):
    r = tiny_llm.post("/llm", json=chat(max_tokens=12))
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "LLMResponse")
    assert body["model"] == DEFAULT and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and "delta" not in choice
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 1 and 1 <= usage["completion_tokens"] <= 12
    assert "generate;dur=" in r.headers["server-timing"]


def test_an_in_process_run_reserves_its_kv_cache(tiny_llm, monkeypatch):
    # A coroutine run goes through the same reservation as a threaded one (issue 16: it used
    # to skip it), and the in-process backend sizes it by the request's tokens.
    service = tiny_llm.app.state.service
    reserved, real = [], service.cache.reserve

    def spy(entry, estimate, *args, **kwargs):
        reserved.append(estimate)
        return real(entry, estimate, *args, **kwargs)

    monkeypatch.setattr(service.cache, "reserve", spy)
    assert tiny_llm.post("/llm", json=chat(max_tokens=4)).status_code == 200
    entry = service.registry.default("llm")
    files = service.models.files(entry)
    short = llm.working_memory(entry, files, llm.Request(**chat(max_tokens=4)), 4)
    long = llm.working_memory(entry, files, llm.Request(**chat(max_tokens=400)), 4)
    assert reserved == [short] and 0 < short < long


def test_max_tokens_reached_is_length(tiny_llm):
    # Greedy decoding of the tiny model repeats one token and never reaches its end token.
    r = tiny_llm.post("/llm/", json=chat(max_tokens=3, temperature=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_seed_repeats_and_defaults_apply(tiny_llm):
    first = tiny_llm.post("/llm", json=chat(max_tokens=16, temperature=1.0, seed=7)).json()
    again = tiny_llm.post("/llm", json=chat(max_tokens=16, temperature=1.0, seed=7)).json()
    assert first["choices"][0]["message"] == again["choices"][0]["message"]
    # No max_tokens: models.yaml's 256 applies (the tiny model may end sooner).
    r = tiny_llm.post("/llm", json={"messages": HELLO, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 256


def test_stop_text_ends_the_answer(tiny_llm):
    greedy = tiny_llm.post("/llm", json=chat(max_tokens=6, temperature=0)).json()
    text = greedy["choices"][0]["message"]["content"]
    assert text, "the tiny model's greedy answer is not empty"
    r = tiny_llm.post("/llm", json=chat(max_tokens=6, temperature=0, stop=[text[0]]))
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stream(tiny_llm):
    r = tiny_llm.post("/llm", json=chat(max_tokens=10, stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = check_stream(r.text)
    assert chunks[-1]["usage"]["completion_tokens"] <= 10
    assert chunks[-1]["choices"][0]["delta"]["content"] == ""
    # The same answer as without streaming, for the same seed.
    plain = tiny_llm.post("/llm", json=chat(max_tokens=10, seed=3)).json()
    streamed = check_stream(tiny_llm.post("/llm", json=chat(max_tokens=10, seed=3,
                                                             stream=True)).text)
    assert text_of(streamed) == plain["choices"][0]["message"]["content"]
    assert streamed[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize("body, field", [
    (chat(temperature=3), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(top_k=0), "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    (chat(model="no/such-model"), "model_id"),
    (chat(model="llama3.1:8b"), "model"),  # an Ollama tag, but this app runs transformers
])
def test_invalid_requests_are_400_naming_the_field(tiny_llm, body, field):
    """go-livepeer's worker answers a decoded /llm 422 to its client as "200 null", so on /llm
    a schema error is the 400 it reads, its message naming the field."""
    for stream in (False, True):
        r = tiny_llm.post("/llm", json={**body, "stream": stream})
        if field == "model" and stream:
            continue  # checked in the stream itself, after the 200
        assert r.status_code == 400, r.text
        assert r.json()["detail"]["msg"].startswith(field), r.json()


def test_closing_a_stream_stops_the_generation(tiny_llm, monkeypatch):
    """A consumer that stops reading (the client went away) stops the generation thread at its
    next token, instead of running to max_tokens: generate returns short of them, and not
    because the model ended its answer."""
    service = tiny_llm.app.state.service
    backend = service.cache.resident(service.registry.default("llm"))
    request = llm.LLMRequest(messages=HELLO, max_tokens=900, temperature=0)
    ctx = SimpleNamespace(stage=None)
    generated: list = []  # (new tokens, the last one) of each generate call
    real = backend.model.generate

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        generated.append((out.shape[-1] - kwargs["input_ids"].shape[-1], int(out[0, -1])))
        return out

    monkeypatch.setattr(backend.model, "generate", generate)

    async def first_chunk_then_close() -> None:
        chunks = llm.stream(backend, request, ctx)
        await chunks.__anext__()
        await chunks.aclose()  # returns once the generation thread has ended

    asyncio.run(first_chunk_then_close())
    ((new, last),) = generated
    assert new < request.max_tokens and last not in backend.eos_ids, (new, last)
    for thread in [t for t in threading.enumerate() if t.name.startswith("llm-generate")]:
        thread.join(timeout=HANG_S)  # it has sent its last message; it may still be exiting
        assert not thread.is_alive()


def test_stop_scanner_holds_back_partial_stop_texts():
    scanner = llm.StopScanner(["END", "\n\n"])
    assert scanner.feed("Hello E") == ("Hello ", False)
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("x") == ("ENx", False)
    assert scanner.feed(" more\n") == (" more", False)
    assert scanner.feed("\nrest") == ("", True)
    scanner = llm.StopScanner(["END"])
    assert scanner.feed("abcEN") == ("abc", False) and scanner.flush() == "EN"


# -- the Ollama backend, against the double ---------------------------------------------------

@contextmanager
def ollama_app(tmp_path_factory, monkeypatch, double: OllamaDouble | None, url: str = "",
               ready: str = "IDLE", **env) -> Iterator[TestClient]:
    """The llm pipeline in tiny mode, forced onto the Ollama backend: through the double's
    mock transport, or (double None) to `url` over real sockets."""
    monkeypatch.setenv("LLM_BACKEND", "ollama")
    monkeypatch.setenv("OLLAMA_HOST", url or "http://ollama.test:11434")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(llm, "CLIENT_OPTIONS", {"transport": double.transport} if double else {})
    settings = Settings(pipeline="llm", tiny=True, device="cpu",
                        tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-llm")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert wait_ready(client) == ready
        yield client


@pytest.fixture
def double() -> OllamaDouble:
    return OllamaDouble(models=("llama3.1:8b", "qwen2.5:7b"), pullable=("mistral:7b",))


def test_ollama_chat(tmp_path_factory, monkeypatch, double):
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        # The warm model was checked and preloaded (an empty conversation) at start.
        assert double.calls("/api/show")[0]["model"] == "llama3.1:8b"
        preload = double.calls("/api/chat")[0]
        assert preload["messages"] == [] and preload["keep_alive"] == -1
        r = client.post("/llm", json=chat(top_k=5, seed=9, stop="END"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert_valid(body, "LLMResponse")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
        assert body["choices"][0]["finish_reason"] == "stop"
        # Usage is the daemon's own prompt_eval_count / eval_count.
        prompt = len(tokens("Hello")) + 4
        assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(tokens(REPLY)),
                                 "total_tokens": prompt + len(tokens(REPLY))}
        sent = double.calls("/api/chat")[-1]
        assert sent["model"] == "llama3.1:8b" and sent["stream"] is False
        assert sent["messages"] == HELLO and sent["keep_alive"] == -1
        assert sent["options"] == {"temperature": 0.7, "top_p": 1.0, "num_predict": 256,
                                   "seed": 9, "top_k": 5, "stop": ["END"]}
        # Defaults: top_k -1 (no limit) is Ollama's 0.
        client.post("/llm", json=chat())
        assert double.calls("/api/chat")[-1]["options"]["top_k"] == 0


def test_ollama_stream(tmp_path_factory, monkeypatch, double):
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        r = client.post("/llm", json=chat(stream=True))
        assert r.status_code == 200, r.text
        chunks = check_stream(r.text)
        assert text_of(chunks) == REPLY
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        prompt = len(tokens("Hello")) + 4
        assert chunks[-1]["usage"] == {"prompt_tokens": prompt,
                                       "completion_tokens": len(tokens(REPLY)),
                                       "total_tokens": prompt + len(tokens(REPLY))}
        assert double.calls("/api/chat")[-1]["stream"] is True
        # max_tokens reached: the daemon's done_reason "length".
        short = check_stream(client.post("/llm", json=chat(stream=True, max_tokens=3)).text)
        assert short[-1]["choices"][0]["finish_reason"] == "length"
        assert short[-1]["usage"]["completion_tokens"] == 3
        r = client.post("/llm", json=chat(max_tokens=3))
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_ollama_tags_directly(tmp_path_factory, monkeypatch, double):
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        r = client.post("/llm", json=chat(model="qwen2.5:7b"))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "qwen2.5:7b"
        sent = double.calls("/api/chat")[-1]
        assert sent["model"] == "qwen2.5:7b" and "keep_alive" not in sent
        r = client.post("/llm", json=chat(model="phi3:mini"))
        assert r.status_code == 400
        assert r.json()["detail"]["msg"].startswith("model: ")
        assert "'phi3:mini'" in r.json()["detail"]["msg"]
        # Streaming: the daemon's 404 arrives before the first chunk, so it is a 400 too.
        r = client.post("/llm", json=chat(model="phi3:mini", stream=True))
        assert r.status_code == 400
        assert "'phi3:mini'" in r.json()["detail"]["msg"]
        # /v1 answers a model it lacks as OpenAI does, a 4xx in FastAPI's 422 list shape.
        r = client.post("/v1/chat/completions", json=chat(model="phi3:mini"))
        assert r.status_code == 422 and "'phi3:mini'" in r.json()["detail"][0]["msg"]


def test_ollama_missing_model_is_400_or_pulled(tmp_path_factory, monkeypatch, double):
    mistral = "mistralai/Mistral-7B-Instruct-v0.3"
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        r = client.post("/llm", json=chat(model=mistral))
        assert r.status_code == 400, r.text
        msg = r.json()["detail"]["msg"]
        assert msg.startswith("model: ")
        assert "'mistral:7b'" in msg and "OLLAMA_PULL=1" in msg
        assert not double.calls("/api/pull")
    with ollama_app(tmp_path_factory, monkeypatch, double, OLLAMA_PULL="1") as client:
        r = client.post("/llm", json=chat(model=mistral))
        assert r.status_code == 200, r.text
        assert double.calls("/api/pull")[-1]["model"] == "mistral:7b"
        assert double.calls("/api/chat")[-1]["model"] == "mistral:7b"
        # A tag the registry does not have either: 422 naming it, with the daemon's reason.
        r = client.post("/llm", json=chat(model="nonexistent:1b"))
        assert r.status_code == 400 and "file does not exist" in r.text


def test_ollama_needs_no_weights_on_disk(tmp_path, monkeypatch, double):
    """The product setup: a GPU node whose MODEL_DIR has no Hugging Face snapshot of the chat
    model picks the Ollama backend by itself, and the warm cache does not look for weights."""
    monkeypatch.delenv("LLM_BACKEND", raising=False)
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama.test:11434")
    monkeypatch.setattr(llm, "CLIENT_OPTIONS", {"transport": double.transport})
    settings = Settings(pipeline="llm", tiny=False, device="cpu", model_dir=tmp_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert wait_ready(client) == "IDLE"
        r = client.post("/llm", json=chat())
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == REPLY


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_ollama_daemon_down(tmp_path_factory, monkeypatch, double):
    # Down from the start: the warm-up fails (/health ERROR) and requests get a clear busy
    # answer: on /llm the 500 "insufficient capacity" go-livepeer can read, on /v1 a 503.
    url = closed_port_url()
    with ollama_app(tmp_path_factory, monkeypatch, None, url=url, ready="ERROR",
                    OLLAMA_WAIT="0") as client:
        r = client.post("/llm", json=chat())
        assert r.status_code == 500, r.text
        assert r.headers["retry-after"]
        msg = r.json()["detail"]["msg"]
        assert msg.startswith("insufficient capacity: ")
        assert "Ollama daemon" in msg and url in msg and "not reachable" in msg
        assert golivepeer.survives("/llm", r).kind == "error"
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.headers["retry-after"], r.text
    # Down after the start: busy, streaming or not (it fails before the first chunk).
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        service = client.app.state.service
        backend = service.cache.resident(service.registry.default("llm"))
        assert asyncio.run(llm.health(backend)) is True
        double.down = True
        for body in (chat(), chat(stream=True)):
            r = client.post("/llm", json=body)
            assert r.status_code == 500 and "not reachable" in r.json()["detail"]["msg"]
        assert asyncio.run(llm.health(backend)) is False


def assert_failed_stream(text: str, tokens_before: int) -> list[dict]:
    """A stream that failed after it started, as go-livepeer reads it: every line a chunk it
    decodes, each with choices, the last with finish_reason "error" and an empty delta, then
    [DONE]; the relay stops at that last chunk."""
    data = sse_data(text)
    assert data[-1] == "[DONE]" and len(data) == tokens_before + 2, data
    read = golivepeer.read_llm_stream(text)
    assert not read.decode_errors and read.relayed == read.chunks
    last = read.chunks[-1]
    assert last["choices"] == [{"index": 0, "finish_reason": "error",
                                "delta": {"role": "assistant", "content": ""}}]
    assert last["id"] == read.chunks[0]["id"]
    assert_valid(last, "LLMResponse")
    return read.chunks


def test_ollama_error_mid_stream_ends_the_stream_with_an_error_chunk(tmp_path_factory,
                                                                     monkeypatch, double,
                                                                     caplog):
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        double.fail_after = 2
        r = client.post("/llm", json=chat(stream=True))
        assert r.status_code == 200
        chunks = assert_failed_stream(r.text, 2)
        assert text_of(chunks[:2]) == "".join(tokens(REPLY)[:2])
        assert "GGML_ASSERT" in caplog.text  # the reason is in the log
        # /v1 keeps OpenAI's convention: an error object, which the openai client raises.
        r = client.post("/v1/chat/completions", json=chat(stream=True))
        *_, last, done = sse_data(r.text)
        assert "GGML_ASSERT" in json.loads(last)["error"]["message"] and done == "[DONE]"


def test_ollama_daemon_gone_mid_stream(tmp_path_factory, monkeypatch, double):
    """The daemon dies after two tokens: the stream ends with a last chunk whose finish_reason
    is "error", and the runner answers the next request (the daemon back up) as usual."""
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        double.die_after = 2
        r = client.post("/llm", json=chat(stream=True))
        assert r.status_code == 200
        assert_failed_stream(r.text, 2)
        double.die_after = None
        assert client.post("/llm", json=chat()).status_code == 200


def test_ollama_memory_hooks(tmp_path_factory, monkeypatch, double):
    """What the warm cache uses: the daemon's size_vram (/api/ps) and unload (keep_alive 0)."""
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        service = client.app.state.service
        backend = service.cache.resident(service.registry.default("llm"))
        assert backend.size_vram() == double.size_vram == daemon_vram(backend)
        client.post("/llm", json=chat(model="qwen2.5:7b"))
        assert backend.size_vram() == double.size_vram
        assert daemon_vram(backend) == 2 * double.size_vram
        backend.unload()
        assert double.calls("/api/chat")[-1]["keep_alive"] == 0
        assert backend.size_vram() == 0 and daemon_vram(backend) == double.size_vram


# -- a client that goes away ------------------------------------------------------------------

def test_disconnect_closes_the_upstream_stream(tmp_path_factory, monkeypatch, live_server):
    """Through a real server and a real socket to the loopback double: a client that closes
    its connection after the first chunk makes the runner close its request to the daemon
    long before the daemon's stream ends, and the model's lane is free again."""
    reply = "word " * 2000
    double = OllamaDouble(reply=reply, delay=0.05)  # 100 s of streaming: more than HANG_S
    with double.serve() as url:
        monkeypatch.setenv("LLM_BACKEND", "ollama")
        monkeypatch.setenv("OLLAMA_HOST", url)
        monkeypatch.setattr(llm, "CLIENT_OPTIONS", {})
        settings = Settings(pipeline="llm", tiny=True, device="cpu",
                            tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-llm")
        app = create_app(settings)
        server = live_server(app)
        with server.client() as client:
            assert wait_ready(client) == "IDLE"
            with client.stream("POST", "/llm", json=chat(stream=True)) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        first = json.loads(line[5:])
                        break
            assert first["choices"][0]["delta"]["content"] == "word"
        assert double.client_gone.wait(HANG_S), "the runner kept reading from the daemon"
        assert double.chunks_sent < len(tokens(reply))
        lanes = app.state.service.executor._lanes.values()
        wait_until(lambda: not any(lane.pending for lane in lanes), "the lane to be free")
        assert [lane.pending for lane in lanes] == [0]
        double.delay = 0
        with server.client() as client:
            r = client.post("/llm", json=chat(max_tokens=5))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_health_follows_the_daemon(tmp_path_factory, monkeypatch, double):
    """/health goes to ERROR when the daemon goes away and back to OK when it returns,
    without a restart (the service re-checks warm models every HEALTH_PROBE_SECONDS)."""
    monkeypatch.setenv("HEALTH_PROBE_SECONDS", "0.1")
    with ollama_app(tmp_path_factory, monkeypatch, double) as client:
        def settles_on(status: str) -> bool:
            return wait_until(lambda: client.get("/health").json()["status"] == status,
                              f"/health {status}", step=0.05)

        double.down = True
        assert settles_on("ERROR")
        double.down = False
        assert settles_on("IDLE")
