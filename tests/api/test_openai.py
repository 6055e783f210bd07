"""The OpenAI API over the llm pipeline, driven by the official `openai` client against a
live server (tiny transformers chat model on CPU)."""

import openai
import pytest

from runner.app import create_app
from runner.settings import Settings
from tests.conftest import wait_ready

pytest.importorskip("pipelines.llm")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import LiveServer

    settings = Settings(pipeline="llm", tiny=True, device="cpu", auth_token="sk-test",
                        tiny_dir=tmp_path_factory.getbasetemp() / "tiny-models-llm-openai")
    with LiveServer(create_app(settings)) as live:
        with live.client() as http:
            assert wait_ready(http) == "IDLE"
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0)


def test_chat_completion(client):
    reply = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=6, seed=1)
    assert reply.object == "chat.completion"
    assert reply.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_chunks(client):
    chunks = list(client.chat.completions.create(
        model="meta-llama/Meta-Llama-3.1-8B-Instruct", messages=MESSAGES, max_tokens=6,
        stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    (usage_chunk,) = [c for c in chunks if not c.choices]
    assert 0 < usage_chunk.usage.completion_tokens <= 6


def test_content_parts_are_joined(client):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    reply = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": parts}], max_tokens=3)
    assert reply.usage.prompt_tokens > 0


def test_models_list(client):
    ids = {m.id for m in client.models.list().data}
    assert "meta-llama/Meta-Llama-3.1-8B-Instruct" in ids and len(ids) >= 2


@pytest.mark.parametrize("kwargs", [{"temperature": 3}, {"top_p": 1.5}, {"max_tokens": 0},
                                    {"model": "nobody/nothing"}])
def test_validation_errors_are_422(client, kwargs):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(**{"model": "", "messages": MESSAGES, **kwargs})


def test_unknown_role_and_empty_messages_are_422(client):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="", messages=[])


def test_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
