"""Generate images from text prompts.

SDXL family (RealVisXL Lightning by default), ByteDance SDXL-Lightning 2/4/8-step UNets on the
SDXL base, and plain SDXL / SD1.5 / sd-turbo / sdxl-turbo through diffusers' auto pipeline.
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
from runner.hub import ModelFiles
from runner.protocol import ImageResponse
from runner.registry import ModelEntry
from runner.sample import Sample, Scale

NAME = "text-to-image"
REQUIRES = ("diffusers", "transformers")
# go-livepeer bills a request without a size as 512x512 (server/ai_http.go); rendering a model's
# 1024x1024 instead would be 4x unbilled work (BILLED_DEFAULTS=false renders it anyway).
BILLED_DEFAULTS = {"width": 512, "height": 512}
MAX_SIDE = 2048


class TextToImageParams(BaseModel):
    model_id: ModelId = ""
    loras: Loras = ""
    prompt: Prompt
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="The height "
                               "in pixels of the generated image; default: the model's own.")
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="The width "
                              "in pixels of the generated image; default: the model's own.")
    guidance_scale: GuidanceScale = None
    negative_prompt: NegativePrompt = ""
    safety_check: SafetyCheck = True
    seed: Seed = None
    num_inference_steps: Steps = None
    num_images_per_prompt: NumImages = 1


Request = TextToImageParams
Response = ImageResponse
Options = diffusion.DiffusionOptions  # models.yaml `options:`: the scheduler


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    return diffusion.load_family(entry, files, device, Options.of(entry))


def run(model: diffusion.DiffusionModel, request: TextToImageParams,
        ctx: RunContext) -> ImageResponse:
    return diffusion.generate_images(model, request, ctx, height=request.height,
                                     width=request.width)


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    diffusion.build_tiny_family(entry, model_dir)


warm_up = diffusion.warm_up  # TORCH_COMPILE: compile at load, at the served size


def image_size(entry: ModelEntry, request: TextToImageParams) -> tuple[int, int]:
    """Width and height of the images: the request's, models.yaml defaults filled in, else the
    size the model was trained at (what diffusers renders without one)."""
    side = diffusion.native_side(entry)
    return request.width or side, request.height or side


def working_memory(entry: ModelEntry, files: ModelFiles, request: TextToImageParams,
                   float_bytes: int) -> int:
    images = request.num_images_per_prompt
    width, height = image_size(entry, request)
    unet, vae = diffusion.activation_widths(entry, files)
    return wm.diffusion(wm.guided_batch(images, request.guidance_scale), width * height // 64,
                        images * width * height, float_bytes, unet, vae_per_pixel=vae)


def largest_fitting(entry: ModelEntry, request: TextToImageParams, fraction: float) -> str:
    return wm.square_hint(*image_size(entry, request), fraction)


def sample_request(scale: Scale) -> Sample:
    """A prompt at the scale's size (unset: the model's default size and steps)."""
    return Sample({"prompt": "a photo of a cat on a sofa", "seed": 1, "model_id": scale.model,
                   "num_images_per_prompt": scale.images, "width": scale.size,
                   "height": scale.size, "num_inference_steps": scale.steps})
