"""Property-based fuzzing of every POST route of the project's OpenAPI document (`openapi.yaml`,
written by scripts/gen_openapi.py; the echo test pipeline's from the app's own `openapi()`).

For bodies built from each route's request schema (valid ones, mutated ones, random field
subsets with wrong types, huge and negative numbers, odd characters and unknown fields,
random bytes as file parts, and bodies that are not what the route reads at all), every
answer is:
- on a generate route, only a status go-livepeer's client decodes there (the double in
  tests/support/golivepeer.py);
- never a 5xx but busy with Retry-After (a 500 "insufficient capacity" on a generate route);
- a 4xx in the contract's error envelope `{"detail": {"msg": ...}}`, or for 422 FastAPI's list
  shape `{"detail": [{"loc", "msg", "type"}]}` (what tests/api/test_errors.py expects);
- a 200 whose body matches the route's response schema.

The real pipelines run in tiny mode with few examples each; the echo pipeline, which goes
through the same route generation, multipart parsing, cache and executor, takes the most.
`HARDENING_FUZZ_SCALE` multiplies the example counts; `HARDENING_FUZZ_RANDOM=1` draws new
examples on every run (the default is a fixed, derandomized set, so CI runs are repeatable).
Each environment fuzzes the routes it serves: `make test` runs this file in `.venv` and the
text-to-speech route in `.venv-tts`.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runner.settings import REPO_ROOT
from runner.spec import discover
from tests.hardening import strategies, support

SPEC = yaml.safe_load((REPO_ROOT / "openapi.yaml").read_text())
SCALE = float(os.environ.get("HARDENING_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("HARDENING_FUZZ_RANDOM") == "1"

# Examples per route: inference is what costs (64x64, 1-2 steps, a few tokens).
EXAMPLES = {
    "/echo-image": 80, "/text-to-image": 20, "/image-to-image": 14, "/image-to-video": 8,
    "/upscale": 10, "/audio-to-text": 14, "/image-to-text": 14, "/segment-anything-2": 30,
    "/llm": 20, "/v1/chat/completions": 14, "/text-to-speech": 10,
}
SPEC_ROUTES = sorted(path for path, ops in SPEC["paths"].items() if "post" in ops)
INSTALLED = discover()
HERE = [path for path in EXAMPLES if path == "/echo-image" or path.strip("/") in INSTALLED
        or (path.startswith("/v1/") and "llm" in INSTALLED)]


def test_every_post_route_of_the_spec_is_fuzzed():
    assert set(SPEC_ROUTES) <= set(EXAMPLES), set(SPEC_ROUTES) - set(EXAMPLES)


def served(client, path: str) -> bool:
    return path in client.app.openapi()["paths"]


def route_and_spec(client, path: str) -> tuple[strategies.Route, dict]:
    assert served(client, path), path
    spec = SPEC if path in SPEC["paths"] else client.app.openapi()
    service = client.app.state.service
    name = "llm" if path.startswith("/v1/") else path.strip("/")
    models = [service.registry.default(name).id]
    if name == "echo-image":
        models.append("test/echo-a")
    return strategies.route_from_spec(spec, path, models), spec


def response_validator(spec: dict, path: str) -> Draft202012Validator | None:
    content = spec["paths"][path]["post"]["responses"]["200"].get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if not schema:
        return None
    registry = Registry().with_resource(
        "urn:spec", Resource.from_contents(spec, default_specification=DRAFT202012))
    ref = schema["$ref"].replace("#/", "urn:spec#/") if "$ref" in schema else None
    return Draft202012Validator({"$ref": ref} if ref else schema, registry=registry)


def check_success(response, validator, request) -> None:
    ctype = response.headers["content-type"]
    if ctype.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.splitlines()
                  if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", (request, response.text[-300:])
        for event in events[:-1]:
            body = json.loads(event)
            assert "error" not in body, (request, body)
        return
    body = response.json()
    if validator is not None:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, (request, errors)


@pytest.mark.parametrize("path", HERE)
def test_fuzzed_requests_never_crash_the_route(runner, path):
    route, spec = route_and_spec(runner, path)
    validator = response_validator(spec, path)
    seen: dict[int, int] = {}

    @settings(max_examples=max(1, int(EXAMPLES[path] * SCALE)), deadline=None,
              derandomize=not RANDOM, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture,
                                     HealthCheck.filter_too_much])
    @given(request=strategies.requests(SPEC if path in SPEC["paths"] else spec, route))
    def fuzz(request):
        response = runner.post(request.path, **request.kwargs)
        status = support.check_answer(response, request)
        seen[status] = seen.get(status, 0) + 1
        if status == 200:
            check_success(response, validator, request)

    fuzz()
    print(f"{path}: {dict(sorted(seen.items()))}")
    assert set(seen) - {200}, "no example was rejected: the strategies lost their teeth"


@pytest.mark.parametrize("path", [p for p in ("/text-to-image", "/llm", "/v1/chat/completions")
                                  if p in HERE])
@pytest.mark.parametrize("body", [
    b'{"prompt": "a", "width": NaN}', b'{"prompt": "a", "guidance_scale": Infinity}',
    b'{"prompt": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"prompt": "a", "seed": -Infinity, "messages": [{"role": "user", "content": "x"}], '
    b'"temperature": NaN}',
    b'{"prompt": "' + b"x" * 30_000 + b'", "messages": 7}',
    b"[" * 100_000, b'{"prompt": "a", "width": ' + b"1" * 5000 + b"}", b'\xff\xfe{"a": 1}',
    b'{"prompt": "a", "width": 3' + b', "x": 1' * 50_000 + b"}",
], ids=["nan", "infinity", "lone-surrogates", "nan-and-inf", "overlong", "deep-nesting",
        "5000-digits", "bad-utf8", "many-keys"])
def test_json_that_python_reads_but_strict_json_cannot_echo(runner, path, body):
    """NaN, Infinity and lone surrogates parse (Python's json accepts them), fail validation,
    and must still come back as a well-formed 422 list rather than a 500 while rendering it."""
    r = runner.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text[:300]
    support.error_message(r)
    json.loads(r.content)  # strict JSON: no NaN tokens, no invalid UTF-8


def test_validation_errors_keep_the_list_shape_the_go_client_decodes(runner):
    r = runner.post("/text-to-image", json={"prompt": "a", "width": 65, "height": "x"})
    assert r.status_code == 422
    locs = {tuple(item["loc"]) for item in r.json()["detail"]}
    assert {("body", "width"), ("body", "height")} <= locs, locs
    support.error_message(r)


@settings(max_examples=int(40 * SCALE), deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
       path=st.sampled_from(["/health", "/version", "/hardware/info", "/hardware/stats",
                             "/models", "/text-to-image/x", "/../etc/passwd", "/%2e%2e/x",
                             "/models/../../x/load", "/models/%00/pin", "/v1/models",
                             "/metrics/", "/docs", "/openapi.json", "//text-to-image"])
       | strategies.odd_text(False, 24).map(lambda s: "/" + quote(s)),
       body=st.binary(max_size=64))
def test_any_method_on_any_path_gets_an_enveloped_answer(runner, method, path, body):
    """Status and operator routes with the wrong method, odd paths and random bodies."""
    r = runner.request(method, path, content=body)
    assert r.status_code < 500 or (r.status_code == 503 and "retry-after" in r.headers), \
        (method, path, r.status_code, r.text[:300])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        support.error_message(r)
