"""Generate images from text prompts.

SDXL family (RealVisXL Lightning by default), ByteDance SDXL-Lightning 2/4/8-step UNets on the
SDXL base, and plain SDXL / SD1.5 / sd-turbo / sdxl-turbo through diffusers' auto pipeline.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from pipelines import _diffusion as diffusion
from runner.device import Device
from runner.hub import ModelFiles
from runner.protocol import ImageResponse
from runner.registry import ModelEntry

NAME = "text-to-image"
MAX_IMAGES = 8
MAX_SIDE = 2048


class TextToImageParams(BaseModel):
    model_id: str = Field("", description="Hugging Face model ID used for image generation.")
    loras: str = Field(
        "", description='A LoRA (Low-Rank Adaptation) model and its corresponding weight for '
        'image generation. Example: { "latent-consistency/lcm-lora-sdxl": 1.0, '
        '"nerijs/pixel-art-xl": 1.2}.')
    prompt: str = Field(max_length=20_000, description="Text prompt(s) to guide image "
                        "generation. Separate multiple prompts with '|' if supported by the model.")
    height: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="The height "
                               "in pixels of the generated image; default: the model's own.")
    width: int | None = Field(None, ge=64, le=MAX_SIDE, multiple_of=8, description="The width "
                              "in pixels of the generated image; default: the model's own.")
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="Encourages model to generate images closely linked to "
        "the text prompt (higher values may reduce image quality); default: the model's own.")
    negative_prompt: str = Field("", max_length=20_000, description="Text prompt(s) to guide "
                                 "what to exclude from image generation. Ignored if "
                                 "guidance_scale < 1.")
    safety_check: bool = Field(True, description="Perform a safety check to estimate if "
                               "generated images could be offensive or harmful.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for random number "
                             "generation; image i uses seed+i.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=150, description="Number of denoising steps; default: the model's own.")
    num_images_per_prompt: int = Field(1, ge=1, le=MAX_IMAGES,
                                       description="Number of images to generate per prompt.")


Request = TextToImageParams
Response = ImageResponse


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    return diffusion.load_family(entry, files, device)


def run(model: diffusion.DiffusionModel, request: TextToImageParams, ctx) -> ImageResponse:
    return diffusion.generate_images(model, request, ctx, height=request.height,
                                     width=request.width)


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    diffusion.build_tiny_family(entry, model_dir)
