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
from runner.device import Device
from runner.hub import ModelFiles
from runner.protocol import ImageResponse
from runner.registry import ModelEntry

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


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    return diffusion.load_family(entry, files, device)


def run(model: diffusion.DiffusionModel, request: TextToImageParams, ctx) -> ImageResponse:
    return diffusion.generate_images(model, request, ctx, height=request.height,
                                     width=request.width)


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    diffusion.build_tiny_family(entry, model_dir)


warm_up = diffusion.warm_up  # TORCH_COMPILE: compile at load, at the served size


def working_memory(entry: ModelEntry, request: TextToImageParams, float_bytes: int) -> int:
    images = request.num_images_per_prompt
    return wm.diffusion(wm.guided_batch(images, request.guidance_scale),
                        request.width * request.height // 64,
                        images * request.width * request.height, float_bytes)


def largest_fitting(entry: ModelEntry, request: TextToImageParams, fraction: float) -> str:
    return wm.square_hint(request.width, request.height, fraction)
