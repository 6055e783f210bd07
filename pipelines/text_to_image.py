"""Generate images from text prompts.

SDXL family (RealVisXL Lightning by default), ByteDance SDXL-Lightning 2/4/8-step UNets on the
SDXL base, and plain SDXL / SD1.5 / sd-turbo / sdxl-turbo through diffusers' auto pipeline.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from pipelines import _diffusion as diffusion
from runner.device import Device
from runner.hub import ModelFiles, writing_snapshot
from runner.protocol import ImageResponse, Media
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
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    diffusion.quiet_loading()
    folder = files.folder(entry.main.repo, entry.main.revision)
    options = dict(dtype=device.dtype(entry.dtype),
                   variant=diffusion.variant_if_present(folder, entry.variant))
    if entry.kind == "sdxl-lightning":
        unet = _lightning_unet(entry, files, folder, device)
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, unet=unet, **options)
    else:
        if entry.kind == "sd":  # images are checked by the runner's own batched checker
            options.update(safety_checker=None, requires_safety_checker=False)
        pipe = AutoPipelineForText2Image.from_pretrained(folder, **options)
    return diffusion.finish_loading(pipe, device, entry.options.get("scheduler"))


def _lightning_unet(entry: ModelEntry, files: ModelFiles, base: Path, device: Device):
    """The step-distilled UNet file on the base SDXL UNet architecture, built without
    allocating random weights first."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    source = entry.components["unet"]
    weights = files.file(source.repo, source.file, source.revision)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    unet.load_state_dict(load_file(weights), assign=True)
    return unet.to(device.torch, device.dtype(entry.dtype))


def run(model: diffusion.DiffusionModel, request: TextToImageParams, ctx) -> ImageResponse:
    import torch

    pipe = model.pipe
    # 1. LoRAs: parsed and checked first, so a bad one costs no GPU time.
    diffusion.activate_loras(model, diffusion.parse_loras(request.loras), ctx.files)
    # 2. Prompts, one per text encoder, and one seed per image.
    prompts = diffusion.prompt_kwargs(pipe, request.prompt, request.negative_prompt)
    image_seeds = diffusion.seeds(request.seed, request.num_images_per_prompt)
    # 3. Denoise all images in one batched call (CFG branches batched by diffusers).
    with ctx.stage("denoise"), torch.inference_mode():
        images = pipe(
            **prompts, height=request.height, width=request.width,
            guidance_scale=request.guidance_scale,
            num_inference_steps=request.num_inference_steps,
            num_images_per_prompt=request.num_images_per_prompt,
            generator=diffusion.generators(model.device, image_seeds),
        ).images
    # 4. Safety check, batched, then the operator's policy for flagged images.
    images, flags = ctx.check_safety(images)
    # 5. PNG data URLs (this runs in a worker thread, off the event loop).
    with ctx.stage("encode"):
        return ImageResponse(images=[
            Media(url=ctx.encode_png(img), seed=seed, nsfw=flag)
            for img, seed, flag in zip(images, image_seeds, flags, strict=True)
        ])


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    """Random weights in the exact layout `load` reads for this entry's kind."""
    files = ModelFiles(model_dir)
    if not files.has(entry.main.repo):
        pipe = diffusion.tiny_sd_pipeline() if entry.kind == "sd" \
            else diffusion.tiny_sdxl_pipeline()
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            diffusion.save_pipeline(pipe, folder)
    if entry.kind == "sdxl-lightning":
        from safetensors.torch import save_file

        source = entry.components["unet"]
        with writing_snapshot(model_dir, source.repo) as folder:
            save_file(diffusion.tiny_sdxl_unet().state_dict(), folder / source.file)
