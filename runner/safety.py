"""The NSFW safety checker (CompVis CLIP checker), loaded through the warm cache like any model.

The checker only detects; what happens to a flagged image is the operator's SAFETY_POLICY:
`black` (the reference behaviour), `blur`, or `flag` (image left as is, `nsfw: true`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from runner.device import Device
from runner.hub import ModelFiles, writing_snapshot
from runner.registry import ModelEntry


@dataclass
class SafetyChecker:
    checker: Any
    processor: Any
    device: Device
    dtype: Any

    def __call__(self, images: list[Image.Image]) -> list[bool]:
        """One batched forward pass for all images."""
        import numpy as np
        import torch

        pixels = self.processor(images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device.torch, self.dtype)
        # The checker blacks out flagged images itself; it gets placeholders since the
        # policy is applied separately.
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        with torch.inference_mode():
            _, flags = self.checker(clip_input=pixels, images=placeholders)
        return [bool(f) for f in flags]


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> SafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPImageProcessor

    folder = files.folder(entry.main.repo, entry.main.revision)
    dtype = device.dtype(entry.dtype)
    checker = StableDiffusionSafetyChecker.from_pretrained(folder, dtype=dtype)
    checker.to(device.torch).eval()
    return SafetyChecker(checker, CLIPImageProcessor.from_pretrained(folder), device, dtype)


def build_tiny(entry: ModelEntry, model_dir: Path, flag_everything: bool = False) -> None:
    """A random-weight checker in the real repo's layout. `flag_everything` makes every image
    count as NSFW, which is how tests reach the flagged path."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(tower, image_size=32, patch_size=4),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config)
    if flag_everything:
        checker.concept_embeds_weights.data.fill_(-1.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        checker.save_pretrained(folder)
        processor.save_pretrained(folder)


def apply_policy(images: list[Image.Image], flags: list[bool], policy: str) -> list[Image.Image]:
    pairs = zip(images, flags, strict=True)
    return [_censor(img, policy) if flagged else img for img, flagged in pairs]


def _censor(image: Image.Image, policy: str) -> Image.Image:
    if policy == "flag":
        return image
    if policy == "blur":
        # Pixelate then blur: unrecognisable at any size, and cheap.
        small = image.resize((max(1, image.width // 32), max(1, image.height // 32)))
        big = small.resize(image.size, Image.Resampling.BILINEAR)
        return big.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 64))
    return Image.new(image.mode, image.size)
