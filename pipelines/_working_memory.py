"""Working-memory estimates per model family: the device bytes one run needs beside its
weights, before it runs, from the model's own architecture (its config files: the width of its
activations) and the request's size. They only have to be the right order of magnitude: on
CUDA the cache replaces them with the peaks it measures per model and size
(`torch.cuda.max_memory_allocated`).

Activations grow with the work's size (pixels, tokens) times the network's width (channels,
hidden size), so each family's figure is that of a reference model scaled by this model's
width over the reference's. The references are per unit of work at 2-byte floats, sized so
that SDXL (320 UNet channels, 128 VAE channels) at 1024x1024 comes to about 2 GiB in the UNet
(a CFG batch of 2) and 3 GiB in the VAE decode, the figures commonly seen with SDPA attention.
A tiny random-weight model of the same family (32 channels) so needs a tenth of that.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from runner.errors import ModelLoadError
from runner.hub import ModelFiles

UNET_BYTES_PER_LATENT_PIXEL = 65536  # per sample in the denoiser's batch, 320 channels
UNET_CHANNELS = 320  # SD/SDXL/SVD UNets' first block_out_channels
UPSCALER_BYTES_PER_PIXEL = 16384  # the x4 UNet: run at the input's resolution, 256 channels
UPSCALER_CHANNELS = 256
VAE_BYTES_PER_PIXEL = 3072  # per decoded output pixel, 128 channels at full resolution
VAE_CHANNELS = 128
MIB = 1 << 20


def config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    """A model folder's config.json (its architecture; or another JSON or YAML file), read once
    per version of the file; empty when there is none to read (the reference figures then
    stand)."""
    path = folder / name
    try:
        return _read_config(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def model_config(files: ModelFiles, repo: str, revision: str = "main", sub: str = ""
                 ) -> dict[str, Any]:
    """`config` of a repo's snapshot (or of its `sub` folder, a pipeline's component)."""
    try:
        folder = files.folder(repo, revision)
    except (ModelLoadError, OSError):
        return {}
    return config(folder / sub if sub else folder)


@functools.lru_cache(maxsize=256)
def _read_config(path: str, mtime_ns: int) -> dict[str, Any]:
    text = Path(path).read_text()
    found = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    return found if isinstance(found, dict) else {}


def width(found: dict[str, Any], reference: int, *keys: str) -> float:
    """This model's width over the reference's: the first number found under `keys` (a dotted
    path into the config; a list's first item, as a UNet's block_out_channels), 1.0 when the
    config says none of them."""
    for key in keys:
        value: Any = found
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, (int, float)) and value > 0:
            return value / reference
    return 1.0


def diffusion(samples: int, latent_pixels: int, decoded_pixels: int, float_bytes: int,
              per_latent_pixel: float = UNET_BYTES_PER_LATENT_PIXEL,
              vae_float_bytes: int | None = None, vae_per_pixel: float = VAE_BYTES_PER_PIXEL
              ) -> int:
    """Denoising and decoding run one after the other: the larger of the two is the peak.
    `per_latent_pixel`, `vae_per_pixel`: the reference figures scaled to this model's widths;
    `vae_float_bytes`: a VAE kept at another precision than the UNet (the x4 upscaler's)."""
    unet = samples * latent_pixels * per_latent_pixel * float_bytes
    vae = decoded_pixels * vae_per_pixel * (vae_float_bytes or float_bytes)
    return int(max(unet, vae)) // 2


def guided_batch(images: int, guidance_scale: float | None, branches: int = 2) -> int:
    """Classifier-free guidance runs the unconditional branch(es) in the same batch."""
    return images * (branches if guidance_scale is not None and guidance_scale > 1 else 1)


def upload_size(upload: Any, max_pixels: int) -> tuple[int, int]:
    """An uploaded image's size from its header alone (nothing decoded), scaled into
    `max_pixels` as the pipeline will; (0, 0) when the header is unreadable, so the pipeline
    gets to answer 400 when it decodes."""
    try:
        upload.file.seek(0)
        with Image.open(upload.file) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            AttributeError):  # a bomb too: decode_image answers it with a 400
        return 0, 0
    finally:
        if hasattr(upload, "file"):
            upload.file.seek(0)
    scale = min(1.0, math.sqrt(max_pixels / max(1, width * height)))
    return int(width * scale), int(height * scale)


def fixed(mib: int, float_bytes: int, batch: int = 1, scale: float = 1.0) -> int:
    """Families whose working memory does not grow with the request (Whisper's 30 s window,
    BLIP's 384 px input, SAM2's 1024 px input): the reference model's per-item figure, scaled
    by this model's size of work over the reference's (`scale`), times the batch."""
    return int(mib * MIB * scale) * batch * float_bytes // 2


def square_hint(width: int, height: int, fraction: float, what: str = "images") -> str:
    """What fits, for size-driven families: memory grows with the pixel count, so the largest
    size is this one scaled by the fraction that fits."""
    side = int(math.sqrt(width * height * max(0.0, fraction))) // 64 * 64
    if side < 64:
        return f"Not even 64x64 {what} fit beside the other models now."
    return f"The largest that fits is about {side}x{side} {what}, or fewer at once."
