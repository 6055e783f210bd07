"""Bearer auth on generate routes only."""

import pytest

from tests.conftest import echo_modules, echo_settings, png_bytes

PNG = ("a.png", png_bytes(), "image/png")


@pytest.fixture
def secured(app_client, make_settings):
    return app_client(echo_settings(make_settings, auth_token="s3cret"), echo_modules())


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
    {"Authorization": "Basic czNjcmV0"}, {"Authorization": "Bearer s3cret-and-more"},
])
def test_generate_routes_need_the_token(secured, headers):
    r = secured.post("/echo-image", files={"image": PNG}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"detail": {"msg": "Invalid bearer token"}}


def test_the_right_token_passes(secured):
    r = secured.post("/echo-image", files={"image": PNG},
                     headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text


def test_auth_is_checked_before_the_body(secured):
    r = secured.post("/echo-image", data={"strength": "7"})
    assert r.status_code == 401


@pytest.mark.parametrize("path", ["/health", "/version", "/hardware/info", "/hardware/stats",
                                  "/metrics", "/metrics/", "/models"])
def test_status_routes_are_open(secured, path):
    assert secured.get(path, follow_redirects=False).status_code == 200


def test_no_token_configured_means_open(echo):
    assert echo.post("/echo-image", files={"image": PNG}).status_code == 200
