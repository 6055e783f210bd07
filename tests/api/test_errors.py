"""Every error status the runner answers with, and its body shape."""

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from runner import errors
from tests.conftest import png_bytes

PNG = ("a.png", png_bytes(), "image/png")


def envelope(response) -> str:
    body = response.json()
    assert set(body) == {"detail"} and set(body["detail"]) == {"msg"}, body
    assert isinstance(body["detail"]["msg"], str) and body["detail"]["msg"]
    return body["detail"]["msg"]


@pytest.mark.parametrize("exc, status", [
    (errors.BadRequest("bad"), 400),
    (errors.Unauthorized("who"), 401),
    (errors.PayloadTooLarge("big"), 413),
    (errors.UnsupportedMedia("what"), 415),
    (errors.InferenceError("boom"), 500),
    (errors.ModelLoadError("gone"), 500),
    (errors.Unavailable("busy", retry_after=7), 503),
])
def test_typed_errors_use_the_contract_envelope(exc, status):
    app = FastAPI()
    errors.install(app, on_busy=lambda exc: None)

    @app.get("/x")
    def raise_it():
        raise exc

    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == status
    assert envelope(r) == exc.msg
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 503:
        assert r.headers["retry-after"] == "7"


@pytest.mark.parametrize("exc, level", [
    (errors.BadRequest("bad"), None),  # a client's mistake is its answer, not an operator's
    (errors.Unauthorized("who"), None),
    (errors.FieldError("model_id", "unknown"), None),
    (errors.Busy("p:m", errors.BusyReason.QUEUE_FULL, "full"), None),  # handed to on_busy
    (errors.Unavailable("the daemon is down"), logging.ERROR),  # an operator must act
    (errors.InferenceError("boom"), logging.ERROR),
    (errors.ModelLoadError("gone"), logging.ERROR),
])
def test_only_what_an_operator_must_act_on_is_logged_at_error(exc, level, caplog):
    busy: list[errors.Busy] = []
    app = FastAPI()
    errors.install(app, on_busy=busy.append)

    @app.get("/x")
    def raise_it():
        raise exc

    caplog.set_level(logging.DEBUG, logger="runner.errors")
    TestClient(app, raise_server_exceptions=False).get("/x")
    assert [r.levelno for r in caplog.records if r.name == "runner.errors"] == \
        ([level] if level else [])
    assert busy == ([exc] if isinstance(exc, errors.Busy) else [])


def test_unexpected_exception_is_a_generic_500():
    app = FastAPI()
    errors.install(app, on_busy=lambda exc: None)

    @app.get("/x")
    def raise_it():
        raise KeyError("secret internals")

    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == 500
    assert "secret" not in envelope(r)


def test_field_error_keeps_fastapis_422_list_shape(echo):
    r = echo.post("/echo-image", files={"image": PNG}, data={"model_id": "nope/nope"})
    assert r.status_code == 422
    (item,) = r.json()["detail"]
    assert item["loc"] == ["body", "model_id"] and item["type"] == "value_error"
    assert "test/echo-small" in item["msg"]


def test_schema_errors_are_422_lists(echo):
    r = echo.post("/echo-image", files={"image": PNG}, data={"strength": "1.5"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "strength"
    r = echo.post("/echo-image", data={"strength": "0.5"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "image"


def test_undecodable_image_is_400(echo):
    r = echo.post("/echo-image", files={"image": ("a.png", b"not an image", "image/png")})
    assert r.status_code == 400
    assert "could not be decoded" in envelope(r)


def test_bad_json_in_a_field_is_400(echo):
    r = echo.post("/echo-image", files={"image": PNG}, data={"points": "[[1,2"})
    assert r.status_code == 400
    assert "points" in envelope(r)


def test_model_failure_is_500_and_the_server_keeps_serving(echo):
    r = echo.post("/echo-image", files={"image": PNG}, data={"fail": "true"})
    assert r.status_code == 500
    assert envelope(r) == "inference failed: RuntimeError"
    assert echo.post("/echo-image", files={"image": PNG}).status_code == 200


def test_unknown_route_uses_the_envelope(echo):
    r = echo.get("/no-such-route")
    assert r.status_code == 404
    envelope(r)


# A route whose go-livepeer client decodes no 413 (the echo route has the default statuses)
# answers an oversize upload with the 400 it can read; ERROR_STATUSES=http answers 413.
OVERSIZE = [("go-livepeer", 400), ("http", 413)]


@pytest.mark.parametrize("mode, status", OVERSIZE)
def test_upload_over_the_cap(app_client, make_settings, mode, status):
    from tests.conftest import echo_modules, echo_settings

    client = app_client(echo_settings(make_settings, max_upload_bytes=64 * 1024,
                                      error_statuses=mode), echo_modules())
    big = ("big.png", b"\0" * (128 * 1024), "image/png")
    r = client.post("/echo-image", files={"image": big})
    assert r.status_code == status
    assert "limit" in envelope(r)
    assert client.post("/echo-image", files={"image": PNG}).status_code == 200


@pytest.mark.parametrize("mode, status", OVERSIZE)
def test_chunked_body_over_the_cap(live_server, make_settings, mode, status):
    from runner.app import create_app
    from tests.conftest import echo_modules, echo_settings

    server = live_server(create_app(echo_settings(make_settings, max_upload_bytes=64 * 1024,
                                                  error_statuses=mode), echo_modules()))

    def chunks():  # no Content-Length: the cap must hold while the body streams
        yield (b'--zzz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(64):
            yield b"x" * 4096

    with server.client() as http:
        r = http.post("/echo-image", content=chunks(),
                      headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == status
    assert "limit" in envelope(r)


COMMON = frozenset({200, 400, 401, 422, 500})  # a generate route's, in go-livepeer's client


@pytest.mark.parametrize("status, decodable, expected", [
    (503, COMMON, (500, "insufficient capacity: busy")),
    (413, COMMON, (400, "busy")),
    (413, COMMON | {413, 415}, (413, "busy")),
    (415, COMMON, (400, "busy")),
    (422, COMMON - {422}, (400, "busy")),
    (499, COMMON, (400, "busy")),
    (500, COMMON, (500, "busy")),
    (503, None, (503, "busy")),
    (413, None, (413, "busy")),
])
def test_for_client_answers_only_what_the_route_decodes(status, decodable, expected):
    assert errors.for_client(status, "busy", decodable) == expected
