"""Upscale an image by increasing its resolution.

Stable Diffusion x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler`): a text-guided latent
diffusion model whose output is four times the input on each side.

The input is capped at the model entry's `max_input_pixels` (models.yaml `options`, 512x512 by
default) by scaling it down, aspect ratio kept, never by rejecting it: a client that sends a
large photo gets the largest upscale this runner serves (2048x2048 for a square input) instead of
an error it cannot act on. Each side is then rounded down to a multiple of 8 (one resize does
both), so the output is exactly 4x the image actually upscaled. The VAE decode at full output
size is this pipeline's memory peak, so VAE tiling is switched on for outputs above
`vae_tiling_above_pixels` and off below it, where tiles would only cost time.

The diffusers pipeline gets no safety checker of its own (it expects an IF-style checker with a
watermark output and cannot take the SD one); the runner's shared checker runs on the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pipelines import _diffusion as diffusion
from pipelines import _working_memory as wm
from pipelines._fields import ModelId, Prompt, SafetyCheck, Seed, Steps
from runner.context import RunContext
from runner.device import Device
from runner.hub import ModelFiles, writing_snapshot
from runner.media import decode_image
from runner.protocol import ImageResponse, Upload
from runner.registry import ModelEntry
from runner.sample import NoiseImage, Sample, Scale

NAME = "upscale"
REQUIRES = ("diffusers", "transformers")
SCALE = 4  # the x4 upscaler's fixed factor: output side = 4 x input side
MULTIPLE = 8  # input sides are cut to this: the UNet downsamples its input-sized latents 3 times
DEFAULT_MAX_INPUT_PIXELS = 512 * 512  # -> 2048x2048 out
DEFAULT_VAE_TILING_ABOVE_PIXELS = 1024 * 1024


class UpscaleParams(BaseModel):
    prompt: Prompt
    image: Upload = Field(description="Uploaded image to modify with the pipeline.")
    model_id: ModelId = ""
    safety_check: SafetyCheck = True
    seed: Seed = None
    num_inference_steps: Steps = None


Request = UpscaleParams
Response = ImageResponse


class Options(diffusion.DiffusionOptions):
    """models.yaml `options:` of upscale models."""

    max_input_pixels: int = Field(
        DEFAULT_MAX_INPUT_PIXELS, gt=0, description="Larger input images are scaled down to "
        "this many pixels, aspect ratio kept (the output has 16 times as many).")
    vae_tiling_above_pixels: int = Field(
        DEFAULT_VAE_TILING_ABOVE_PIXELS, ge=0, description="Outputs of more pixels than this "
        "are decoded by the VAE in tiles.")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    pipe = diffusion.from_folder(
        StableDiffusionUpscalePipeline, entry, files, device,
        # Images are checked by the runner's batched checker after run(); the diffusers
        # upscaler expects an IF-style checker and fails with the SD one.
        safety_checker=None, feature_extractor=None, watermarker=None,
    )
    model = diffusion.finish_loading(pipe, device, Options.of(entry).scheduler)
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.get("force_upcast", True):
        # The x4 VAE overflows in fp16: diffusers would cast it to fp32 and back around every
        # decode (with a deprecation warning each time); keeping it fp32 does that once.
        pipe.vae.to(torch.float32)
    return model


def input_cap(entry: ModelEntry) -> int:
    return Options.of(entry).max_input_pixels


def needs_vae_tiling(width: int, height: int, entry: ModelEntry) -> bool:
    """Whether an output of `width` x `height` is large enough to decode in tiles."""
    return width * height > Options.of(entry).vae_tiling_above_pixels


def set_vae_tiling(vae: Any, on: bool) -> None:
    """Per request: the model runs one request at a time (max_concurrency 1 by default)."""
    if on:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def run(model: diffusion.DiffusionModel, request: UpscaleParams,
        ctx: RunContext) -> ImageResponse:
    import torch

    pipe = model.pipe
    # 1. Decode the upload (400 if undecodable or over MAX_IMAGE_PIXELS), then scale it down to
    #    the model's input cap, sides rounded down to a multiple of 8; the output is 4x that.
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    image = diffusion.fit_image(image, MULTIPLE, input_cap(ctx.entry))
    # 2. One seed, one generator (a random 32-bit seed when the client sent none).
    image_seeds = diffusion.seeds(request.seed, 1)
    generator = diffusion.generators(model.device, image_seeds)
    # 3. Prompt, and VAE tiling only where the full-size decode would be the memory peak.
    prompts = diffusion.prompt_kwargs(pipe, request.prompt, "")
    set_vae_tiling(pipe.vae, needs_vae_tiling(image.width * SCALE, image.height * SCALE,
                                              ctx.entry))
    # 4. Denoise at the input size and decode to 4x (CFG branches batched by diffusers).
    with ctx.stage("denoise"), torch.inference_mode():
        images = pipe(**prompts, image=image, num_inference_steps=request.num_inference_steps,
                      generator=generator, callback_steps=1,
                      callback=lambda *_: ctx.check_cancelled()).images
    # 5. The runner's safety checker on the output, then PNG encoding.
    return diffusion.image_response(images, image_seeds, ctx)


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The config measured in ../shared/notes/tiny-models-diffusion.md ("d. x4 upscaler").

def tiny_upscale_pipeline() -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=32,
        in_channels=7, out_channels=4,  # 4 latent channels + the 3 noised low-res RGB channels
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,  # the tiny CLIP text encoder's hidden size
        attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=1000,  # indexed by noise_level: must exceed it (real model: 1000)
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4, layers_per_block=1,
        scaling_factor=0.08333,  # 3 blocks: factor 4, as the real upscaler VAE
    )
    low_res = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=diffusion.tiny_text_encoder(), tokenizer=diffusion.tiny_tokenizer(),
        unet=unet, low_res_scheduler=low_res, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, watermarker=None, max_noise_level=350,
    )


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        diffusion.save_pipeline(tiny_upscale_pipeline(), folder)


def working_memory(entry: ModelEntry, files: ModelFiles, request: UpscaleParams,
                   float_bytes: int) -> int:
    width, height = wm.upload_size(request.image, input_cap(entry))
    out = 16 * width * height
    # The x4 UNet denoises at the input's own resolution, guided (batch 2); the VAE decodes
    # 4x that per side, in tiles above the threshold (about one 512x512 tile's worth).
    decoded = min(out, 512 * 512) if needs_vae_tiling(4 * width, 4 * height, entry) else out
    # load() keeps the VAE in float32 whatever the entry's dtype: its decode costs 4-byte floats.
    unet, vae = diffusion.activation_widths(entry, files, wm.UPSCALER_BYTES_PER_PIXEL,
                                            wm.UPSCALER_CHANNELS)
    return wm.diffusion(2, width * height, decoded, float_bytes, unet, vae_float_bytes=4,
                        vae_per_pixel=vae)


def largest_fitting(entry: ModelEntry, request: UpscaleParams, fraction: float) -> str:
    return wm.square_hint(*wm.upload_size(request.image, input_cap(entry)), fraction,
                          "input images")


def sample_request(scale: Scale) -> Sample:
    """A noise image of the scale's size (unset: 512x512), four times larger out."""
    side = (scale.size, scale.size) if scale.size else (512, 512)
    return Sample({"prompt": "a photo of a cat on a sofa", "seed": 1, "model_id": scale.model,
                   "num_inference_steps": scale.steps},
                  uploads={"image": NoiseImage(*side)}, params={"image_size": side})
