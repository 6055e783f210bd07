"""Request fields several pipelines share, declared once: their types, bounds and
descriptions. A pipeline's Request names them and sets its own defaults."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_PROMPT = 20_000
MAX_IMAGES = 8

ModelId = Annotated[str, Field(
    description="Hugging Face model ID; '' = the runner's default model for the pipeline.")]
Prompt = Annotated[str, Field(
    max_length=MAX_PROMPT, description="Text prompt(s) to guide generation. Separate multiple "
    "prompts with '|' if supported by the model.")]
NegativePrompt = Annotated[str, Field(
    max_length=MAX_PROMPT, description="Text prompt(s) to guide what to exclude from image "
    "generation. Ignored if guidance_scale < 1.")]
Loras = Annotated[str, Field(
    description='A LoRA (Low-Rank Adaptation) model and its corresponding weight for image '
    'generation. Example: { "latent-consistency/lcm-lora-sdxl": 1.0, '
    '"nerijs/pixel-art-xl": 1.2}.')]
GuidanceScale = Annotated[float | None, Field(
    ge=0, le=50, description="Encourages model to generate images closely linked to the text "
    "prompt (higher values may reduce image quality); default: the model's own.")]
SafetyCheck = Annotated[bool, Field(
    description="Perform a safety check to estimate if generated images could be offensive or "
    "harmful.")]
Seed = Annotated[int | None, Field(
    ge=0, le=2**63 - 1, description="Seed for random number generation (image i of a batch "
    "uses seed+i); a random 32-bit seed when absent.")]
Steps = Annotated[int | None, Field(
    ge=1, le=150, description="Number of denoising steps. More steps usually lead to higher "
    "quality but slower inference; default: the model's own.")]
NumImages = Annotated[int, Field(
    ge=1, le=MAX_IMAGES, description="Number of images to generate per prompt.")]
