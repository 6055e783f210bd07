"""Apply image transformations to a provided image.

InstructPix2Pix (the default: "make it snowy"), SDXL img2img (RealVisXL Lightning, SDXL base),
ByteDance SDXL-Lightning step checkpoints, sd-turbo / sdxl-turbo, through the same loading,
LoRA, seed and safety code as text-to-image.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from pipelines import _diffusion as diffusion
from pipelines import _working_memory as wm
from pipelines._fields import (
    GuidanceScale,
    Loras,
    ModelId,
    NegativePrompt,
    NumImages,
    Prompt,
    SafetyCheck,
    Seed,
    Steps,
)
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles
from runner.media import decode_image
from runner.protocol import ImageResponse, Upload
from runner.registry import ModelEntry
from runner.sample import NoiseImage, Sample, Scale

NAME = "image-to-image"
REQUIRES = ("diffusers", "transformers")
DEFAULT_MAX_PIXELS = 1024 * 1024
SDXL_KINDS = ("sdxl", "sdxl-lightning")


class ImageToImageParams(BaseModel):
    prompt: Prompt
    image: Upload = Field(description="Uploaded image to modify with the pipeline.")
    model_id: ModelId = ""
    loras: Loras = ""
    strength: float | None = Field(
        None, ge=0, le=1, description="Degree of transformation applied to the reference image "
        "(0 to 1); default: the model's own.")
    guidance_scale: GuidanceScale = None
    image_guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Degree to which the generated image is pushed towards "
        "the initial image (InstructPix2Pix); default: the model's own.")
    negative_prompt: NegativePrompt = ""
    safety_check: SafetyCheck = True
    seed: Seed = None
    num_inference_steps: Steps = None
    num_images_per_prompt: NumImages = 1


Request = ImageToImageParams
Response = ImageResponse


class Options(diffusion.DiffusionOptions):
    """models.yaml `options:` of image-to-image models."""

    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Larger input images are "
                            "scaled down to this many pixels, aspect ratio kept.")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    return diffusion.load_family(entry, files, device, Options.of(entry))


def run(model: diffusion.DiffusionModel, request: ImageToImageParams,
        ctx: RunContext) -> ImageResponse:
    entry = ctx.entry
    # 1. The input: EXIF-rotated RGB, scaled into the model's pixel cap, sides a multiple of
    #    the model's latent grid (64 for SDXL); the output size follows it.
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    multiple = 64 if entry.kind in SDXL_KINDS else 8
    image = diffusion.fit_image(image, multiple, Options.of(entry).max_pixels)
    # 2. img2img denoises strength x steps of the schedule: at least one step must remain.
    if entry.kind != "pix2pix":
        check_strength(request.strength, request.num_inference_steps)
    # 3. The shared run: LoRAs, prompts, seeds, one batched call, safety, PNG encoding.
    return diffusion.generate_images(
        model, request, ctx, image=image, strength=request.strength,
        image_guidance_scale=request.image_guidance_scale,
        height=image.height, width=image.width)


def check_strength(strength: float | None, steps: int | None) -> None:
    if strength is not None and steps is not None and int(strength * steps) < 1:
        raise BadRequest(f"strength {strength} with {steps} steps leaves no denoising step; "
                         f"use strength >= {1 / steps:.3g} or more steps")


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    diffusion.build_tiny_family(entry, model_dir)


warm_up = diffusion.warm_up  # TORCH_COMPILE: compile at load, at the served size


def output_size(entry: ModelEntry, request: ImageToImageParams) -> tuple[int, int]:
    return wm.upload_size(request.image, Options.of(entry).max_pixels)


def working_memory(entry: ModelEntry, files: ModelFiles, request: ImageToImageParams,
                   float_bytes: int) -> int:
    width, height = output_size(entry, request)
    images = request.num_images_per_prompt
    # instruct-pix2pix guides on the text and on the image: three branches per image.
    branches = 3 if entry.kind == "pix2pix" else 2
    unet, vae = diffusion.activation_widths(entry, files)
    return wm.diffusion(wm.guided_batch(images, request.guidance_scale, branches),
                        width * height // 64, images * width * height, float_bytes, unet,
                        vae_per_pixel=vae)


def largest_fitting(entry: ModelEntry, request: ImageToImageParams, fraction: float) -> str:
    return wm.square_hint(*output_size(entry, request), fraction, "input images")


def sample_request(scale: Scale) -> Sample:
    """An edit of a noise image of the scale's size (unset: 512x512)."""
    side = (scale.size, scale.size) if scale.size else (512, 512)
    return Sample({"prompt": "make it snowy", "seed": 1, "model_id": scale.model,
                   "num_inference_steps": scale.steps, "num_images_per_prompt": scale.images},
                  uploads={"image": NoiseImage(*side)}, params={"image_size": side})
