import pytest

from tests.conftest import decode_png_url, png_bytes


def test_text_to_image_returns_png_data_url(t2i):
    r = t2i.post("/text-to-image", json={"prompt": "a cat", "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    (image,) = r.json()["images"]
    assert decode_png_url(image["url"]).size == (64, 64)
    assert image["nsfw"] is False


def test_echo_multipart(echo):
    r = echo.post("/echo-image", files={"image": ("a.png", png_bytes(), "image/png")},
                  data={"strength": "0.500000", "flag": "true", "points": "[[10,20]]"})
    assert r.status_code == 200, r.text
    assert r.json()["strength"] == 0.5 and r.json()["flag"] is True
    assert r.json()["points"] == [[10, 20]]


def test_the_readme_curl_works_without_a_json_content_type(t2i):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded."""
    body = b'{"prompt":"a cat","width":64,"height":64}'
    for content_type in ("application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        r = t2i.post("/text-to-image", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["url"].startswith("data:image/png;base64,")
    r = t2i.post("/text-to-image", content=b"prompt=a+cat",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    r = t2i.post("/text-to-image", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 422


def test_the_images_device_cuda_without_a_gpu_reports_error_and_still_answers(
        app_client, make_settings, tmp_path):
    """The images set DEVICE=cuda: on a host without a GPU the warm model cannot load, so
    /health says ERROR (the HEALTHCHECK fails), and every status route still answers."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    client = app_client(make_settings(device="cuda", tiny=False, model_dir=tmp_path))
    assert client.get("/health").json() == {"status": "ERROR"}
    version = client.get("/version")
    assert version.status_code == 200 and version.json()["mode"] == "gpu"
    for path in ("/hardware/info", "/hardware/stats", "/models", "/metrics"):
        assert client.get(path).status_code == 200, path
