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
