"""Working-memory estimates per model family: the device bytes one run needs beside its
weights, before it runs. They only have to be the right order of magnitude: the cache replaces
them with the peaks it measures per model and size (`torch.cuda.max_memory_allocated`).

The constants are per unit of work at 2-byte floats, sized so that SDXL at 1024x1024 comes to
about 2 GiB in the UNet (a CFG batch of 2) and 3 GiB in the VAE decode, the figures commonly
seen with SDPA attention.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, UnidentifiedImageError

UNET_BYTES_PER_LATENT_PIXEL = 65536  # per sample in the denoiser's batch
UPSCALER_BYTES_PER_PIXEL = 16384  # the x4 UNet: fewer channels, run at the input's resolution
VAE_BYTES_PER_PIXEL = 3072  # per decoded output pixel
MIB = 1 << 20


def diffusion(samples: int, latent_pixels: int, decoded_pixels: int, float_bytes: int,
              per_latent_pixel: int = UNET_BYTES_PER_LATENT_PIXEL,
              vae_float_bytes: int | None = None) -> int:
    """Denoising and decoding run one after the other: the larger of the two is the peak.
    `vae_float_bytes`: a VAE kept at another precision than the UNet (the x4 upscaler's)."""
    unet = samples * latent_pixels * per_latent_pixel * float_bytes
    vae = decoded_pixels * VAE_BYTES_PER_PIXEL * (vae_float_bytes or float_bytes)
    return max(unet, vae) // 2


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


def fixed(mib: int, float_bytes: int, batch: int = 1) -> int:
    """Families whose working memory does not grow with the request (Whisper's 30 s window,
    BLIP's 384 px input, SAM2's 1024 px input): a per-item figure times the batch."""
    return mib * MIB * batch * float_bytes // 2


def square_hint(width: int, height: int, fraction: float, what: str = "images") -> str:
    """What fits, for size-driven families: memory grows with the pixel count, so the largest
    size is this one scaled by the fraction that fits."""
    side = int(math.sqrt(width * height * max(0.0, fraction))) // 64 * 64
    if side < 64:
        return f"Not even 64x64 {what} fit beside the other models now."
    return f"The largest that fits is about {side}x{side} {what}, or fewer at once."
