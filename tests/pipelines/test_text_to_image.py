"""text-to-image end to end in tiny mode: real diffusers classes loaded from folders."""

import json

import numpy as np
import pytest

from pipelines import _diffusion as diffusion
from runner.hub import writing_snapshot
from tests.conftest import decode_png_url, pixels, serving
from tests.support.helpers import write_tiny_lora

SMALL = {"width": 64, "height": 64}


def generate(client, **fields):
    r = client.post("/text-to-image", json={"prompt": "a cat", **SMALL, **fields})
    assert r.status_code == 200, r.text
    return r.json()["images"]


def test_seeds_are_consecutive_and_reproducible(t2i):
    images = generate(t2i, seed=42, num_images_per_prompt=2)
    assert [i["seed"] for i in images] == [42, 43]
    again = generate(t2i, seed=42, num_images_per_prompt=2)
    assert np.array_equal(pixels(images[0]), pixels(again[0]))
    # Each image depends on its own seed only: the second equals a lone run at seed 43.
    alone = generate(t2i, seed=43)
    assert np.abs(pixels(images[1]) - pixels(alone[0])).max() <= 2
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_a_random_32_bit_seed_when_none_is_sent(t2i):
    images = generate(t2i, num_images_per_prompt=3)
    first = images[0]["seed"]
    assert 0 <= first < 2**32
    assert [i["seed"] for i in images] == [first, first + 1, first + 2]


def test_prompts_split_on_bar_feed_the_second_text_encoder(t2i):
    one = generate(t2i, seed=1, prompt="a cat")
    two = generate(t2i, seed=1, prompt="a cat|the dog")
    assert not np.array_equal(pixels(one[0]), pixels(two[0]))
    negative = generate(t2i, seed=1, prompt="a cat", negative_prompt="a dog|a cat",
                        guidance_scale=3.0)
    assert negative[0]["seed"] == 1
    r = t2i.post("/text-to-image", json={"prompt": "a|b|c", **SMALL})
    assert r.status_code == 400 and "at most 2" in r.json()["detail"]["msg"]


def test_model_defaults_come_from_models_yaml(t2i):
    r = t2i.post("/text-to-image", json={"prompt": "x", "model_id": "stabilityai/sd-turbo"})
    assert r.status_code == 200, r.text
    assert decode_png_url(r.json()["images"][0]["url"]).size == (512, 512)


@pytest.mark.parametrize("model_id", ["ByteDance/SDXL-Lightning-4step",
                                      "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_other_listed_models_load_on_demand(t2i, model_id):
    (image,) = generate(t2i, model_id=model_id, seed=3)
    assert decode_png_url(image["url"]).size == (64, 64)
    states = {m["id"]: m["state"] for m in t2i.get("/models").json()["models"]}
    assert states[model_id] == "ready"


@pytest.mark.parametrize("fields, status", [
    ({"model_id": "nobody/nothing"}, 422),
    ({"width": 65}, 422),
    ({"height": 4096}, 422),
    ({"num_images_per_prompt": 9}, 422),
    ({"num_inference_steps": 0}, 422),
    ({"seed": -1}, 422),
    ({"guidance_scale": "lots"}, 422),
])
def test_bad_fields(t2i, fields, status):
    r = t2i.post("/text-to-image", json={"prompt": "a cat", **SMALL, **fields})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], list)


def test_missing_prompt_and_bad_json_body_are_422(t2i):
    assert t2i.post("/text-to-image", json={}).status_code == 422
    r = t2i.post("/text-to-image", content=b"{not json", headers={"content-type":
                                                                  "application/json"})
    assert r.status_code == 422


# -- LoRAs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loras(t2i):
    """Two random LoRAs written into the runner's MODEL_DIR (tiny mode: its tiny folder)."""
    model_dir = t2i.app.state.service.model_dir
    with writing_snapshot(model_dir, "test/tiny-sdxl-lora") as folder:
        write_tiny_lora(diffusion.tiny_sdxl_pipeline(), folder)
    with writing_snapshot(model_dir, "test/tiny-sd15-lora") as folder:
        write_tiny_lora(diffusion.tiny_sd_pipeline(), folder)
    return model_dir


def test_lora_changes_the_image_and_switches_off_again(t2i, loras):
    plain = generate(t2i, seed=9)
    with_lora = generate(t2i, seed=9, loras=json.dumps({"test/tiny-sdxl-lora": 1.0}))
    assert not np.array_equal(pixels(plain[0]), pixels(with_lora[0]))
    weaker = generate(t2i, seed=9, loras='{"test/tiny-sdxl-lora": 0.3}')
    assert not np.array_equal(pixels(weaker[0]), pixels(with_lora[0]))
    after = generate(t2i, seed=9)
    assert np.abs(pixels(plain[0]) - pixels(after[0])).max() <= 1


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('["test/tiny-sdxl-lora"]', "JSON object"),
    ('{"test/tiny-sdxl-lora": -1}', "non-negative"),
    ('{"test/absent-lora": 1.0}', "not available"),
    ('{"../../etc/passwd": 1.0}', "not a model id"),
    ('{"https://example.com/x": 1.0}', "not a model id"),
    (json.dumps({f"a/l{i}": 1 for i in range(5)}), "at most 4"),
    ('{"test/tiny-sd15-lora": 1.0}', "does not fit this model"),
])
def test_lora_errors_are_400(t2i, loras, value, message):
    r = t2i.post("/text-to-image", json={"prompt": "a cat", **SMALL, "loras": value})
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]["msg"]
    generate(t2i, seed=1)  # and the model still serves


# -- safety --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["black", "blur", "flag"])
def test_flagged_images_follow_the_safety_policy(flagging_dir, policy):
    with serving("text-to-image", flagging_dir, safety_policy=policy) as client:
        checked = generate(client, seed=5, num_images_per_prompt=2)
        unchecked = generate(client, seed=5, num_images_per_prompt=2, safety_check=False)
    assert [i["nsfw"] for i in checked] == [True, True]
    assert [i["nsfw"] for i in unchecked] == [False, False]
    original, result = pixels(unchecked[0]), pixels(checked[0])
    if policy == "black":
        assert result.max() == 0
    elif policy == "blur":
        assert result.max() > 0 and not np.array_equal(result, original)
    else:
        assert np.array_equal(result, original)


def test_server_timing_names_each_stage(t2i):
    r = t2i.post("/text-to-image", json={"prompt": "a cat", **SMALL})
    stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert {"model", "denoise", "safety", "encode"} <= set(stages)
    assert all(float(ms) >= 0 for ms in stages.values())


# -- fused attention ---------------------------------------------------------------------
# On CUDA the UNet's and VAE's q/k/v run fused; run here on CPU by calling the same functions
# the CUDA load path calls.

def run_tiny(model):
    import torch

    with torch.inference_mode():
        return model.pipe("a cat", width=64, height=64, num_inference_steps=2,
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
                          output_type="np").images


def fresh_tiny_sd():
    import torch

    from runner.device import Device

    torch.manual_seed(0)
    return diffusion.DiffusionModel(diffusion.tiny_sd_pipeline(), Device("cpu"))


def parameter_count(model):
    return sum(p.numel() for name in ("unet", "vae")
               for p in getattr(model.pipe, name).parameters())


def assert_same_weights(model, plain):
    """Unfused again means the plain model's layers and values, no fused copy left over."""
    import torch

    for name in ("unet", "vae"):
        mine, theirs = (getattr(m.pipe, name).state_dict() for m in (model, plain))
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_fused_attention_matches_and_unfuses_for_a_lora(tmp_path):
    """The outputs are the same, the fused layers replace the separate ones rather than
    doubling them (the cache sizes a model from its files), and a model unfuses before its
    first LoRA (fused attention would bypass the adapter's layers)."""
    from runner.hub import ModelFiles, writing_snapshot

    with writing_snapshot(tmp_path, "test/fuse-lora") as folder:
        write_tiny_lora(diffusion.tiny_sd_pipeline(), folder)
    files = ModelFiles(tmp_path)
    plain, fused = fresh_tiny_sd(), fresh_tiny_sd()
    diffusion.fuse_attention(fused)
    assert fused.fused and hasattr(fused.pipe.unet.down_blocks[1].attentions[0]
                                   .transformer_blocks[0].attn1, "to_qkv")
    assert parameter_count(fused) == pytest.approx(parameter_count(plain), rel=0.01)
    np.testing.assert_allclose(run_tiny(fused), run_tiny(plain), atol=1e-4)
    diffusion.unfuse_attention(fused)
    assert not fused.fused and parameter_count(fused) == parameter_count(plain)
    assert_same_weights(fused, plain)
    np.testing.assert_allclose(run_tiny(fused), run_tiny(plain), atol=1e-4)
    diffusion.fuse_attention(fused)  # fused again, for the LoRA to unfuse
    for model in (plain, fused):
        diffusion.activate_loras(model, {"test/fuse-lora": 1.0}, files)
    assert not fused.fused
    np.testing.assert_allclose(run_tiny(fused), run_tiny(plain), atol=1e-4)
    assert not np.allclose(run_tiny(plain), run_tiny(fresh_tiny_sd()), atol=1e-3)  # it acts


def test_fused_attention_survives_moves_between_dtypes_and_devices():
    """The runner moves models with .to() (GPU and CPU RAM, fp16): a fused model still runs
    after a round trip, stays small, and unfuses to the same weights as a plain model that
    made the same trip."""
    import torch

    plain, fused = fresh_tiny_sd(), fresh_tiny_sd()
    diffusion.fuse_attention(fused)
    for model in (plain, fused):
        model.pipe.to(torch.float16)
    assert {p.dtype for p in fused.pipe.unet.parameters()} == {torch.float16}
    for model in (plain, fused):
        model.pipe.to("cpu", torch.float32)
    assert parameter_count(fused) == pytest.approx(parameter_count(plain), rel=0.01)
    np.testing.assert_allclose(run_tiny(fused), run_tiny(plain), atol=1e-4)
    diffusion.unfuse_attention(fused)
    assert_same_weights(fused, plain)
    np.testing.assert_allclose(run_tiny(fused), run_tiny(plain), atol=1e-4)
    # Shapes alone (the meta device) still split back to the separate layers' shapes.
    meta = fresh_tiny_sd()
    diffusion.fuse_attention(meta)
    meta.pipe.unet.to("meta")
    diffusion.unfuse_attention(meta)
    shapes = {k: v.shape for k, v in meta.pipe.unet.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.pipe.unet.state_dict().items()}
