"""segment-anything-2 end to end in tiny mode: transformers' Sam2Model loaded from the folder
build_tiny writes (a 64x64-input model with 16x16 low-res masks), driven over HTTP with multipart
bodies as go-livepeer sends them (JSON arrays and booleans as strings)."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines import segment_anything_2 as sam2
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest, ModelLoadError
from runner.hub import ModelFiles, writing_snapshot
from runner.registry import ModelEntry
from runner.settings import Settings
from tests.conftest import post_image, serving
from tests.support import torchvision_transforms
from tests.support.contract import assert_valid

ROUTE = "/segment-anything-2"
WIDTH, HEIGHT = 48, 32  # not square, and not the model's 64x64 input
LOW_RES = 16  # the tiny model's low-res mask side (256 for the real ones)
POINT = {"point_coords": "[[10,20]]", "point_labels": "[1]"}


def noise_png(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def post(client, image: bytes | None = None, path: str = ROUTE, **fields):
    return post_image(client, path, noise_png() if image is None else image, **fields)


def segment(client, image: bytes | None = None, **fields) -> dict:
    r = post(client, image, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid(body, "MasksResponse")
    return {key: np.array(json.loads(body[key])) for key in ("masks", "scores", "logits")}


def bad_request(client, field: str, **fields) -> str:
    r = post(client, **fields)
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "HTTPError")
    msg = r.json()["detail"]["msg"]
    assert field in msg, msg
    return msg


def loaded(client, model_id: str = "") -> sam2.Segmenter:
    service = client.app.state.service
    entry = service.registry.resolve(sam2.NAME, model_id)
    return service.cache.resident(entry)


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    with serving(sam2.NAME, tmp_path_factory.getbasetemp() / "tiny-models-sam2") as client:
        yield client


# -- the contract's shapes -------------------------------------------------------------------


def test_point_prompt_gives_three_masks_at_the_input_size_best_first(sam):
    out = segment(sam, **POINT)
    assert out["masks"].shape == (3, HEIGHT, WIDTH)
    assert out["masks"].dtype == np.float64  # return_logits defaults to true: logits
    assert out["logits"].shape == (3, LOW_RES, LOW_RES)
    assert np.abs(out["logits"]).max() <= 32  # clamped as the official predictor does
    assert (out["masks"] > 0).any() and (out["masks"] < 0).any()
    # Bilinear upsampling (align_corners false) puts the low-res corners on the image corners:
    # a transposed or flipped mask would not match.
    for y, x in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
        assert np.allclose(out["masks"][:, y, x], out["logits"][:, y, x], atol=1e-3)
    scores = out["scores"]
    assert scores.shape == (3,) and np.all((0 <= scores) & (scores <= 1))
    assert list(scores) == sorted(scores, reverse=True)
    assert segment(sam, path=ROUTE + "/", **POINT)["masks"].shape == (3, HEIGHT, WIDTH)
    elsewhere = segment(sam, point_coords="[[40,5]]", point_labels="[1]")
    assert not np.array_equal(elsewhere["masks"], out["masks"])


def test_single_mask_and_binary_masks(sam):
    logits = segment(sam, multimask_output="false", **POINT)
    assert logits["masks"].shape == (1, HEIGHT, WIDTH)
    assert logits["scores"].shape == (1,) and logits["logits"].shape == (1, LOW_RES, LOW_RES)
    binary = segment(sam, multimask_output="false", return_logits="false", **POINT)
    assert binary["masks"].dtype == np.int64 and set(np.unique(binary["masks"])) <= {0, 1}
    # The binary mask is the logits thresholded at 0 (logits are rounded to 3 decimals).
    decided = np.abs(logits["masks"]) > 1e-3
    assert np.array_equal(binary["masks"][decided], (logits["masks"] > 0)[decided])
    assert np.array_equal(binary["scores"], logits["scores"])
    assert np.allclose(binary["logits"], logits["logits"])


def test_box_points_and_mask_input_prompts(sam):
    box = segment(sam, box="[4,2,40,30]")
    assert box["masks"].shape == (3, HEIGHT, WIDTH)
    assert segment(sam, box="[[4,2,40,30]]")["scores"].tolist() == box["scores"].tolist()
    both = segment(sam, box="[4,2,40,30]", point_coords="[[10,20],[30,5]]",
                   point_labels="[1,0]")
    assert not np.array_equal(both["masks"], box["masks"])
    # The low-res logits of an answer go back in as the next request's mask_input.
    previous = json.dumps(box["logits"][:1].tolist())
    refined = segment(sam, mask_input=previous, multimask_output="false", **POINT)
    assert refined["masks"].shape == (1, HEIGHT, WIDTH)
    assert segment(sam, mask_input=previous)["masks"].shape == (3, HEIGHT, WIDTH)


def test_normalize_coords_follows_the_reference(sam):
    """true (the default): pixel coordinates, normalised by the server; false: already
    fractions of the image's width and height."""
    pixels = segment(sam, point_coords="[[12,8]]", point_labels="[1]", box="[6,4,36,24]")
    fractions = segment(sam, point_coords="[[0.25,0.25]]", point_labels="[1]",
                        box="[0.125,0.125,0.75,0.75]", normalize_coords="false")
    assert np.allclose(pixels["masks"], fractions["masks"], atol=2e-3)
    assert np.allclose(pixels["scores"], fractions["scores"])
    msg = bad_request(sam, "point_coords", point_coords="[[12,8]]", point_labels="[1]",
                      normalize_coords="false")
    assert "[0, 1]" in msg


def test_a_portrait_image(sam):
    out = segment(sam, noise_png(20, 50, seed=3), point_coords="[[19,49]]", point_labels="[1]")
    assert out["masks"].shape == (3, 50, 20)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "fields"), [
    ("point_coords", {"point_coords": "not json", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[[1,2,3]]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[1,2]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[[1,2],[3]]", "point_labels": "[1,1]"}),
    ("point_coords", {"point_coords": '[["a","b"]]', "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[[NaN,2]]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[[true,false]]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": json.dumps([[1, 1]] * 65), "point_labels": "[1]"}),
    ("point_labels", {"point_coords": "[[1,2]]", "point_labels": "[1,1]"}),
    ("point_labels", {"point_coords": "[[1,2]]", "point_labels": "[[1]]"}),
    ("point_labels", {"point_coords": "[[1,2]]", "point_labels": "[2]"}),
    ("point_labels", {"point_coords": "[[1,2]]", "point_labels": "{"}),
    ("point_labels", {"point_coords": "[[1,2]]"}),
    ("point_labels", {"point_labels": "[1]", "box": "[1,1,5,5]"}),
    ("box", {"box": "[1,2,3]"}),
    ("box", {"box": "[[1,2,3,4],[1,2,3,4]]"}),
    ("box", {"box": "[30,20,10,5]"}),
    ("box", {"box": '{"x": 1}'}),
    ("mask_input", {"mask_input": "[[0.5]]"}),
    ("mask_input", {"mask_input": json.dumps(np.zeros((1, 8, 8)).tolist())}),
    ("mask_input", {"mask_input": json.dumps(np.zeros((LOW_RES, LOW_RES)).tolist())}),
    ("mask_input", {"mask_input": "[[[0]"}),
])
def test_bad_prompts_are_400_naming_the_field(sam, field, fields):
    bad_request(sam, field, **fields)


@pytest.mark.parametrize(("field", "fields"), [
    ("point_coords", {"point_coords": f"[[{WIDTH + 1},5]]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": "[[5,-1]]", "point_labels": "[1]"}),
    ("point_coords", {"point_coords": f"[[5,{HEIGHT}.5]]", "point_labels": "[1]"}),
    ("box", {"box": f"[0,0,{WIDTH},{HEIGHT + 1}]"}),
    ("box", {"box": "[0,0,0.5,1.5]", "normalize_coords": "false"}),
])
def test_prompts_outside_the_image_are_400(sam, field, fields):
    assert "outside" in bad_request(sam, field, **fields)


def test_the_image_edges_are_inside(sam):
    corners = f"[[0,0],[{WIDTH},{HEIGHT}]]"
    segment(sam, point_coords=corners, point_labels="[1,0]", box=f"[0,0,{WIDTH},{HEIGHT}]")


def test_a_request_without_any_prompt_is_400(sam):
    msg = bad_request(sam, "point_coords")
    assert "box" in msg and "mask_input" in msg
    bad_request(sam, "point_coords", point_coords="", point_labels="", box=" ")


def test_missing_or_undecodable_image(sam):
    r = sam.post(ROUTE, data=POINT)
    assert r.status_code == 422, r.text
    assert any(item["loc"][-1] == "image" for item in r.json()["detail"])
    r = post(sam, b"not an image", **POINT)
    assert r.status_code == 400, r.text
    assert_valid(r.json(), "HTTPError")


@pytest.mark.parametrize("fields", [
    {"multimask_output": "maybe"}, {"return_logits": "2"}, {"model_id": "nobody/nothing"},
])
def test_schema_errors_are_422(sam, fields):
    r = post(sam, **POINT, **fields)
    assert r.status_code == 422, r.text
    assert_valid(r.json(), "HTTPValidationError")


# -- the embedding cache -----------------------------------------------------------------------


def test_prompts_on_one_image_run_the_image_encoder_once(sam):
    model = loaded(sam)
    image = noise_png(seed=11)
    before = model.encoded
    first = post(sam, image, **POINT)
    assert "embed;" in first.headers["server-timing"]
    second = post(sam, image, **POINT)
    assert "embed;" not in second.headers["server-timing"]
    assert second.json() == first.json()  # the cached embedding gives the same answer
    post(sam, image, box="[1,1,20,20]")
    assert model.encoded == before + 1
    # The same pixels in another container are the same image; other pixels are not.
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).save(buf, format="BMP")
    post(sam, buf.getvalue(), **POINT)
    assert model.encoded == before + 1
    post(sam, noise_png(seed=12), **POINT)
    assert model.encoded == before + 2
    assert len(model.embeddings) <= sam2.DEFAULT_EMBEDDING_CACHE


def test_embedding_cache_keeps_the_most_recently_used():
    cache = sam2.EmbeddingCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    off = sam2.EmbeddingCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0


# -- models and loaders ------------------------------------------------------------------------


def test_every_listed_model_builds_and_serves_in_tiny_mode(sam):
    service = sam.app.state.service
    for entry in service.registry.entries(sam2.NAME)[1:]:
        assert entry.kind == "sam2-hf"
        out = segment(sam, model_id=entry.id, **POINT)
        assert out["masks"].shape == (3, HEIGHT, WIDTH)
    # The tiny snapshots are in the layout of facebook/sam2.1-*: the video model's config.
    config = json.loads((service.models.files(entry).folder(entry.main.repo) / "config.json")
                        .read_text())
    assert config["model_type"] == "sam2_video"


def test_the_kind_picks_the_loader_and_the_snapshot_decides_when_it_lacks_that_format(
        sam, tmp_path, monkeypatch):
    service = sam.app.state.service
    default = service.registry.default(sam2.NAME)
    files = ModelFiles(service.model_dir)
    # A sam2-pt entry whose snapshot holds only Hugging Face files loads them.
    as_pt = default.model_copy(update={"kind": "sam2-pt"})
    assert isinstance(sam2.load(as_pt, files, Device("cpu")), sam2.TransformersSam2)
    # A snapshot with only an official checkpoint needs the sam2 package.
    with writing_snapshot(tmp_path, "someone/sam2-pt-only") as folder:
        (folder / "sam2_hiera_large.pt").write_bytes(b"")
    entry = ModelEntry(id="someone/sam2-pt-only", kind="sam2-hf", pipeline=sam2.NAME)
    # Without the sam2 package (every image but segment-anything-2's), or with it but without
    # torchvision (as `make install` leaves it), both say what is missing. A None in
    # sys.modules is how Python marks a module as absent.
    for absent in ("sam2", "torchvision"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, absent, None)
            with pytest.raises(ModelLoadError, match="`sam2` package and torchvision"):
                sam2.load(entry, ModelFiles(tmp_path), Device("cpu"))
            with pytest.raises(ModelLoadError, match="`sam2` package and torchvision"):
                sam2.build_tiny(entry.model_copy(update={"kind": "sam2-pt"}), tmp_path)
    with pytest.raises(ModelLoadError, match="unknown kind"):
        sam2.load(default.model_copy(update={"kind": "sam"}), files, Device("cpu"))


def test_a_move_leaves_no_tensor_of_the_model_behind(sam):
    """The cache demotes a model by moving its modules: loose tensors and cached embeddings
    would stay on the GPU and count as a leak."""
    import torch

    from runner.footprint import walk

    service = sam.app.state.service
    model = sam2.load(service.registry.default(sam2.NAME), ModelFiles(service.model_dir),
                      Device("cpu"))
    model.embeddings.put("an image", [torch.zeros(4)])
    sam2.move(model, "cpu")
    assert len(model.embeddings) == 0
    assert [t for t in walk(model) if isinstance(t, torch.Tensor)] == []
    assert model.embed(np.zeros((32, 48, 3), dtype=np.uint8))  # still works after the move


def test_official_checkpoint_through_the_sam2_package(tmp_path, monkeypatch):
    """The sam2 package (installed by `make install`, without its torchvision) on an official-
    layout .pt checkpoint and yaml; torchvision's three transforms are stood in for where the
    real ones cannot load (tests/support/torchvision_transforms.py)."""
    torchvision_transforms.provide(monkeypatch)
    entry = ModelEntry(id="facebook/sam2-hiera-large", kind="sam2-pt", pipeline=sam2.NAME)
    sam2.build_tiny(entry, tmp_path)
    files = ModelFiles(tmp_path)
    model = sam2.load(entry, files, Device("cpu"))
    assert isinstance(model, sam2.OfficialSam2)
    request = sam2.SegmentAnything2Params.model_construct(
        image=FakeUpload(noise_png()), model_id="", point_coords="[[10,20]]",
        point_labels="[1]", box=None, mask_input=None, multimask_output=True,
        return_logits=False, normalize_coords=True)
    ctx = RunContext(entry, Device("cpu"), files, Settings())
    out = sam2.run(model, request, ctx)
    assert np.array(json.loads(out.masks)).shape == (3, HEIGHT, WIDTH)
    assert np.array(json.loads(out.logits)).shape == (3, LOW_RES, LOW_RES)
    sam2.move(model, "cpu")  # a demotion drops the predictor's image state too
    assert model.predictor._features is None and len(model.embeddings) == 0


class FakeUpload:
    def __init__(self, data: bytes):
        self.file = io.BytesIO(data)


# -- pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 40.0, 1e6])
def test_json_array_matches_json(shape, scale):
    values = (np.random.default_rng(0).standard_normal(shape) * scale).astype(np.float32)
    for decimals in (0, 3):
        parsed = np.array(json.loads(sam2.json_array(values, decimals)))
        expected = np.floor(values.astype(np.float64) * 10**decimals + 0.5) / 10**decimals
        assert parsed.shape == shape
        assert np.allclose(parsed, expected, rtol=0, atol=1e-6 * max(1.0, scale))
    bits = values > 0
    assert json.loads(sam2.json_array(bits)) == bits.astype(int).tolist()


def test_json_array_format():
    assert sam2.json_array(np.array([0.0, -0.0004, -0.0006, 1.5, -12.3456, 100.0]), 3) == \
        "[0.000,0.000,-0.001,1.500,-12.346,100.000]"
    assert sam2.json_array(np.array([[0, 1], [1, 0]], dtype=np.uint8)) == "[[0,1],[1,0]]"


def test_prompt_parsing_without_a_server():
    request = sam2.SegmentAnything2Params.model_construct(
        point_coords="[[24, 16]]", point_labels="[0]", box="[0, 0, 48, 32]", mask_input=None,
        normalize_coords=True)
    prompts = sam2.parse_prompts(request, WIDTH, HEIGHT, (LOW_RES, LOW_RES))
    assert prompts.points.tolist() == [[0.5, 0.5]] and prompts.labels.tolist() == [0]
    assert prompts.box.tolist() == [0, 0, 1, 1] and prompts.mask is None
    with pytest.raises(BadRequest, match="mask_input"):
        sam2.parse_mask_input(json.dumps(np.zeros((1, 256, 256)).tolist()), (LOW_RES, LOW_RES))
    assert sam2.parse_mask_input(json.dumps(np.zeros((1, 256, 256)).tolist()),
                                 (256, 256)).shape == (1, 256, 256)


def test_torch_compile_compiles_the_image_encoder_and_warms_it_at_load(tmp_path, monkeypatch):
    """TORCH_COMPILE: the encoder is compiled in place and run once while the model loads.
    torch.compile itself is replaced by a recorder here (the diffusion test compiles for real)."""
    import torch

    from tests.conftest import serving

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append(type(self).__name__))
    embedded = []
    original = sam2.TransformersSam2.embed
    monkeypatch.setattr(sam2.TransformersSam2, "embed",
                        lambda self, pixels: embedded.append(pixels.shape) or
                        original(self, pixels))
    with serving("segment-anything-2", tmp_path / "tiny", torch_compile=True) as client:
        assert client.get("/health").json() == {"status": "IDLE"}
    assert compiled == ["Sam2VisionModel"]
    assert embedded == [(64, 64, 3)]  # the warm-up, before any request
