"""runner.safety: what each SAFETY_POLICY does to flagged images, and the tiny checker."""

from __future__ import annotations

import pytest
from PIL import Image, ImageStat

from runner import safety
from runner.device import Device
from runner.hub import ModelFiles
from runner.registry import ModelEntry


def checkerboard(size: int = 128, cell: int = 8, mode: str = "RGB") -> Image.Image:
    image = Image.new("L", (size, size))
    image.putdata([255 if (x // cell + y // cell) % 2 else 0
                   for y in range(size) for x in range(size)])
    return image.convert(mode)


def identical(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_black_policy_blacks_out_flagged_images(mode):
    image = checkerboard(mode=mode)
    (out,) = safety.apply_policy([image], [True], "black")
    assert out.size == image.size and out.mode == image.mode
    assert out.tobytes() == bytes(len(image.tobytes()))  # every byte zero


def test_blur_policy_hides_detail_without_blacking_out():
    image = checkerboard()
    (out,) = safety.apply_policy([image], [True], "blur")
    assert out.size == image.size and out.mode == image.mode
    assert not identical(out, image)
    assert any(out.tobytes()), "blurred, not black"
    # The 8-pixel checkerboard is gone: what is left is close to flat grey.
    low, high = out.convert("L").getextrema()
    assert high - low < 64
    assert 64 < ImageStat.Stat(out.convert("L")).mean[0] < 192


def test_blur_policy_handles_tiny_images():
    image = checkerboard(size=8, cell=1)
    (out,) = safety.apply_policy([image], [True], "blur")
    assert out.size == (8, 8)


def test_flag_policy_leaves_the_image_as_is():
    image = checkerboard()
    (out,) = safety.apply_policy([image], [True], "flag")
    assert identical(out, image)


@pytest.mark.parametrize("policy", ["black", "blur", "flag"])
def test_unflagged_images_are_untouched(policy):
    images = [checkerboard(), checkerboard(cell=4), checkerboard(cell=2)]
    copies = [im.copy() for im in images]
    out = safety.apply_policy(images, [False, True, False], policy)
    assert out[0] is images[0] and out[2] is images[2]
    assert identical(out[0], copies[0]) and identical(out[2], copies[2])
    assert identical(images[1], copies[1])  # the flagged input itself is not modified
    if policy == "black":
        assert not any(out[1].tobytes())


def test_flags_must_match_images():
    with pytest.raises(ValueError):
        safety.apply_policy([checkerboard()], [True, False], "black")


# -- the tiny checker (loads torch, diffusers and transformers) ---------------------------------

CHECKER = ModelEntry(id="CompVis/stable-diffusion-safety-checker", kind="clip-safety-checker")


@pytest.mark.parametrize("flag_everything, expected", [(True, [True, True]),
                                                       (False, [False, False])])
def test_tiny_checker_flags(tmp_path, flag_everything, expected):
    safety.build_tiny(CHECKER, tmp_path, flag_everything=flag_everything)
    checker = safety.load(CHECKER, ModelFiles(tmp_path), Device("cpu"))
    images = [checkerboard(64), Image.new("RGB", (48, 80), (200, 30, 30))]
    assert checker(images) == expected
