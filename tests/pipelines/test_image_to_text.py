"""image-to-text end to end in tiny mode: the real BlipForConditionalGeneration loaded from the
folder build_tiny writes, driven over HTTP with multipart bodies as go-livepeer sends them; and
the batcher that puts concurrent requests into one generate call."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from pipelines import image_to_text
from pipelines.image_to_text import Batcher
from tests.conftest import png_bytes, post_image, serving
from tests.support.contract import assert_valid
from tests.support.helpers import HANG_S, wait_until

BASE = "Salesforce/blip-image-captioning-base"
# A collection window longer than any wait here: a batch closes because it is full, and one
# that waited for the window instead would fail the test (its callers would not be back).
WINDOW_S = 10 * HANG_S


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def post(client, image: bytes | None = None, path: str = "/image-to-text", **fields):
    return post_image(client, path, png_bytes(40, 30) if image is None else image, **fields)


def caption(client, image: bytes | None = None, **fields) -> str:
    r = post(client, image, **fields)
    assert r.status_code == 200, r.text
    assert_valid(r.json(), "ImageToTextResponse")
    return r.json()["text"]


def caption_model(client, model_id: str = "") -> image_to_text.CaptionModel:
    """The loaded model object, through the cache's public API."""
    service = client.app.state.service
    entry = service.registry.resolve("image-to-text", model_id)

    async def get():
        async with service.cache.use(entry) as model:
            return model

    return client.portal.call(get)


@contextmanager
def batches_of(model: image_to_text.CaptionModel, size: int):
    """Batches of exactly `size` (per key): each closes once full, however long its callers
    take to arrive, so concurrent test requests surely meet in one."""
    before = model.batcher.window_s, model.batcher.max_batch_size
    model.batcher.window_s, model.batcher.max_batch_size = WINDOW_S, size
    try:
        yield
    finally:
        model.batcher.window_s, model.batcher.max_batch_size = before


def concurrently(fn, args: list) -> list:
    results: list = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(args[i])
        except BaseException as exc:  # noqa: BLE001 - handed to the asserting thread
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_S)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting"
    return results


@pytest.fixture(scope="module")
def i2t(tmp_path_factory):
    """The image-to-text app in tiny mode; its warm-up builds and loads the tiny checkpoint."""
    with serving("image-to-text", tmp_path_factory.getbasetemp() / "tiny-models-i2t") as client:
        yield client


# -- over HTTP -----------------------------------------------------------------------------

def test_caption_matches_the_contract(i2t):
    text = caption(i2t)
    assert text and text == text.strip()
    assert caption(i2t, path="/image-to-text/") == text  # greedy: the same image, same text
    r = post(i2t)
    assert "caption" in r.headers["server-timing"]


def test_a_prompt_starts_the_caption(i2t):
    text = caption(i2t, prompt="a picture of")
    assert text.startswith("a picture of ")  # the reference returns the whole decoded text
    assert caption(i2t, prompt="") == caption(i2t)  # '' is the unconditional caption


def test_other_model_id_loads_on_demand(i2t):
    def ready() -> set[str]:
        return {m["id"] for m in i2t.get("/models").json()["models"] if m["state"] == "ready"}

    assert BASE not in ready()
    assert caption(i2t, model_id=BASE)
    assert BASE in ready()


def test_undecodable_image_is_400(i2t):
    r = post(i2t, b"not an image")
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "HTTPError")


def test_prompt_longer_than_the_model_reads_is_400(i2t):
    r = post(i2t, prompt="a " * 130)  # 132 tokens; the tiny decoder has 128 positions
    assert r.status_code == 400, r.text
    assert "tokens" in r.json()["detail"]["msg"]


@pytest.mark.parametrize("fields", [
    {"prompt": "x" * (image_to_text.MAX_PROMPT_CHARS + 1)},
    {"model_id": "nobody/nothing"},
])
def test_bad_fields_are_422(i2t, fields):
    r = post(i2t, **fields)
    assert r.status_code == 422, r.text
    assert_valid(r.json(), "HTTPValidationError")


def test_missing_image_is_422(i2t):
    r = i2t.post("/image-to-text", data={"prompt": "a picture of"})
    assert r.status_code == 422, r.text
    assert any(item["loc"][-1] == "image" for item in r.json()["detail"])


def test_upload_over_the_limit_is_413(i2t):
    with serving("image-to-text", i2t.app.state.service.model_dir,
                 max_upload_bytes=4096) as small:
        r = post(small, noise_png(64, 64))  # about 12 KiB
        assert r.status_code == 413, r.text
        assert_valid(r.json(), "HTTPError")
        assert caption(small, png_bytes(8, 8))  # small uploads still pass


def test_concurrent_requests_share_generate_calls(i2t):
    # Four prompts of 4 tokens ([CLS] w w [SEP]) and two unconditional: two groups.
    prompts = ["a cat", "a dog", "red cat", "blue dog", "", ""]
    images = [noise_png(24, 24, seed) for seed in range(len(prompts))]
    alone = [caption(i2t, image, prompt=p) for image, p in zip(images, prompts, strict=True)]
    model = caption_model(i2t)
    calls, items = model.batcher.calls, model.batcher.items
    with batches_of(model, 2):  # each group (4 and 2) is an even number
        together = concurrently(lambda i: caption(i2t, images[i], prompt=prompts[i]),
                                list(range(len(prompts))))
    assert model.batcher.items - items == len(prompts)
    assert model.batcher.calls - calls < len(prompts)
    assert model.batcher.largest >= 2
    # Each caller got its own caption, the same as when it ran alone.
    assert together == alone
    for prompt, text in zip(prompts, together, strict=True):
        assert isinstance(text, str) and text.startswith(prompt)


def test_a_failed_batch_fails_each_caller_and_the_next_batch_works(i2t, monkeypatch):
    model = caption_model(i2t)

    def broken(**kwargs):
        raise RuntimeError("generate failed")

    monkeypatch.setattr(model.model, "generate", broken)
    failures = model.batcher.failures
    with batches_of(model, 3):
        responses = concurrently(lambda _: post(i2t), [0, 1, 2])
    assert [r.status_code for r in responses] == [500, 500, 500]
    for r in responses:
        assert_valid(r.json(), "HTTPError")
    assert model.batcher.failures - failures == 1
    monkeypatch.undo()
    assert caption(i2t)


# -- the batcher -------------------------------------------------------------------------------

class Recorder:
    """A fake batched function: records each batch, answers item + '!'."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.gate = gate

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if self.gate is not None:
            assert self.gate.wait(HANG_S)
        if "bad" in items:
            raise ValueError("bad item")
        return [f"{item}!" for item in items]


def test_batcher_results_follow_their_callers():
    fn = Recorder()
    batcher = Batcher(fn, max_batch_size=5, window_s=WINDOW_S)
    results = concurrently(batcher.submit, [f"item{i}" for i in range(5)])
    assert results == [f"item{i}!" for i in range(5)]
    assert len(fn.batches) == 1 and sorted(fn.batches[0]) == [f"item{i}" for i in range(5)]
    assert (batcher.calls, batcher.items, batcher.largest, batcher.pending) == (1, 5, 5, 0)


def test_batcher_closes_a_full_batch_without_waiting():
    fn = Recorder()
    batcher = Batcher(fn, max_batch_size=2, window_s=WINDOW_S)
    results = concurrently(batcher.submit, list(range(4)))  # no one is left waiting
    assert results == [f"{i}!" for i in range(4)]
    assert sorted(len(b) for b in fn.batches) == [2, 2]


def test_batcher_keeps_keys_apart():
    fn = Recorder()
    batcher = Batcher(fn, max_batch_size=2, window_s=WINDOW_S)  # a mixed pair would be full
    items = ["a1", "b1", "a2", "b2"]
    results = concurrently(lambda item: batcher.submit(item, key=item[0]), items)
    assert results == ["a1!", "b1!", "a2!", "b2!"]
    assert sorted(sorted(b) for b in fn.batches) == [["a1", "a2"], ["b1", "b2"]]


def test_batcher_failure_reaches_every_caller_and_the_next_batch_runs():
    fn = Recorder()
    batcher = Batcher(fn, max_batch_size=3, window_s=WINDOW_S)
    results = concurrently(batcher.submit, ["x", "bad", "y"])
    assert all(isinstance(r, ValueError) for r in results), results
    assert batcher.failures == 1 and batcher.pending == 0
    batcher.window_s = 0.0  # a batch of one runs at once
    assert batcher.submit("z") == "z!"
    assert fn.batches[-1] == ["z"]


def test_batcher_rejects_a_wrong_number_of_results():
    batcher = Batcher(lambda items: items[:1], max_batch_size=2,
                      window_s=WINDOW_S)  # one result, whatever the batch
    results = concurrently(batcher.submit, [1, 2])
    assert all(isinstance(r, RuntimeError) for r in results), results
    batcher.window_s = 0.0
    assert batcher.submit(3) == 3  # a batch of one: one result, as it should be


def test_batcher_fills_the_next_batch_while_one_runs():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, max_batch_size=8, window_s=0.0)  # no collection window at all
    first = threading.Thread(target=batcher.submit, args=("first",))
    first.start()
    wait_until(lambda: fn.batches, "the first batch to run", step=0.005)
    later: list = []
    threads = [threading.Thread(target=lambda i=i: later.append(batcher.submit(f"later{i}")))
               for i in range(3)]
    for t in threads:
        t.start()
    # all three wait for the first batch to finish, together
    wait_until(lambda: batcher.pending >= 3, "three waiting items", step=0.005)
    gate.set()
    for t in [first, *threads]:
        t.join(timeout=HANG_S)
    assert fn.batches[0] == ["first"]
    assert sorted(fn.batches[1]) == ["later0", "later1", "later2"] and len(fn.batches) == 2
    assert sorted(later) == ["later0!", "later1!", "later2!"]


def test_batcher_needs_a_positive_batch_size():
    with pytest.raises(ValueError):
        Batcher(lambda items: items, max_batch_size=0)
