"""Generate a video from an input image.

Stable Video Diffusion (img2vid-xt and xt-1-1, 25 frames). The input image and a sample of the
output frames go through the safety checker; when any is flagged, every frame is. Frames come
back as PNG data URLs in one batch, as the contract says, or with `output_format=mp4` as one
H.264 video in a `data:video/mp4` URL.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from pipelines import _diffusion as diffusion
from pipelines import _working_memory as wm
from pipelines._fields import ModelId, SafetyCheck, Seed, Steps
from runner import safety
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.media import data_url, decode_image
from runner.options import Options as BaseOptions
from runner.protocol import Media, Upload
from runner.registry import ModelEntry
from runner.sample import NoiseImage, Sample, Scale

NAME = "image-to-video"
REQUIRES = ("diffusers", "transformers", "av")
MIN_SIDE = 64
MAX_SIDE = 1024
SIZE_MULTIPLE = 8  # SVD's latents are 1/8 of the frame size
SAFETY_SAMPLES = 4  # output frames checked, evenly spaced, first and last included
# SVD's own frame size (width, height) and frame rate, for a field neither the client nor the
# entry's models.yaml defaults set.
NATIVE_SIZE = (1024, 576)
NATIVE_FPS = 7


class ImageToVideoParams(BaseModel):
    image: Upload = Field(description="Uploaded image to generate a video from.")
    model_id: ModelId = ""
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="The height in "
                               "pixels of the generated video, a multiple of 8; default: the "
                               "model's own.")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="The width in pixels "
                              "of the generated video, a multiple of 8; default: the model's "
                              "own.")
    fps: int | None = Field(None, ge=1, le=60, description="The frames per second of the "
                            "generated video.")
    motion_bucket_id: int | None = Field(
        None, ge=0, le=1023, description="Used for conditioning the amount of motion for the "
        "generation. The higher the number the more motion will be in the video.")
    noise_aug_strength: float | None = Field(
        None, ge=0, le=10, description="Amount of noise added to the conditioning image. "
        "Higher values reduce resemblance to the conditioning image and increase motion.")
    safety_check: SafetyCheck = True
    seed: Seed = None
    num_inference_steps: Steps = None
    output_format: Literal["frames", "mp4"] | None = Field(
        None, description="`frames` (default): one PNG data URL per frame; `mp4`: the whole "
        "video as one H.264 `data:video/mp4` URL.")


class VideoResponse(BaseModel):
    """Response model for video generation."""

    frames: list[list[Media]] = Field(description="The generated video frames.")


Request = ImageToVideoParams
Response = VideoResponse


class Options(BaseOptions):
    """models.yaml `options:` of image-to-video models."""

    num_frames: int | None = Field(None, gt=0, description="Frames per video; default: what "
                                   "the model was trained for (its UNet config).")
    decode_chunk_size: int = Field(8, gt=0, description="Frames the VAE decodes at a time: "
                                   "fewer use less memory.")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> diffusion.DiffusionModel:
    from diffusers import StableVideoDiffusionPipeline

    pipe = diffusion.from_folder(StableVideoDiffusionPipeline, entry, files, device)
    # No channels_last here: the UNet's temporal Conv3d weights are 5-D, and torch refuses
    # channels_last for them ("required rank 4 tensor").
    return diffusion.finish_loading(pipe, device, scheduler=None, channels_last=False)


def frame_size(request: ImageToVideoParams) -> tuple[int, int]:
    """Width and height of the frames: the request's, models.yaml defaults filled in."""
    return request.width or NATIVE_SIZE[0], request.height or NATIVE_SIZE[1]


def run(model: diffusion.DiffusionModel, request: ImageToVideoParams,
        ctx: RunContext) -> VideoResponse:
    import torch

    pipe, options = model.pipe, Options.of(ctx.entry)
    width, height = frame_size(request)
    fps = request.fps or NATIVE_FPS
    # 1. Frame size the model can take (latents are 1/8 of it), then the upload.
    for name, value in (("height", height), ("width", width)):
        if value % SIZE_MULTIPLE:
            raise BadRequest(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value}")
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    if min(image.size) < 2:  # SVD's antialiased resize pads each side by a pixel
        raise BadRequest(f"the image is {image.width}x{image.height} pixels; image-to-video "
                         "needs at least 2 pixels on each side")
    # The pipeline resizes the input in float32 on the CPU (a 4096x4096 upload, a few KB as
    # PNG, took 1.6 GB): shrink a huge one first, aspect ratio kept, to 4x the frame's pixels
    # (and at least 448x448, twice what the CLIP image encoder reads), never up.
    image = diffusion.fit_image(image, 1, max(4 * width * height, 448 * 448))
    # 2. The input image is checked first: a flagged one makes every frame flagged, and
    #    under the black policy the video is not generated at all.
    _, (flagged,) = ctx.check_safety([image])
    num_frames = options.num_frames or int(pipe.unet.config.num_frames)
    (seed,) = diffusion.seeds(request.seed, 1)
    if flagged and ctx.settings.safety_policy == "black":
        frames = [Image.new("RGB", (width, height))] * num_frames
    else:
        # 3. Denoise all frames in one call; the VAE decodes them in chunks.
        (generator,) = diffusion.generators(model.device, [seed])
        with ctx.stage("denoise"), torch.inference_mode():
            frames = pipe(
                image, height=height, width=width, num_frames=num_frames,
                num_inference_steps=request.num_inference_steps, fps=fps,
                motion_bucket_id=request.motion_bucket_id,
                noise_aug_strength=request.noise_aug_strength,
                decode_chunk_size=options.decode_chunk_size,
                generator=generator, callback_on_step_end=ctx.step_callback).frames[0]
        # 4. A sample of the output frames in one batched check; if the input or any
        #    sampled frame is flagged, the operator's policy applies to every frame.
        if not flagged:
            _, sample_flags = ctx.check_safety([frames[i] for i in sample(len(frames))])
            flagged = any(sample_flags)
        if flagged:
            frames = safety.apply_policy(frames, [True] * len(frames),
                                         ctx.settings.safety_policy)
    # 5. One batch: a PNG data URL per frame, or the whole video as one mp4 data URL.
    with ctx.stage("encode"):
        if request.output_format == "mp4":
            urls = [data_url("video/mp4", encode_mp4(frames, fps))]
        else:
            urls = [ctx.encode_png(frame) for frame in frames]
    return VideoResponse(frames=[[Media(url=url, seed=seed, nsfw=flagged) for url in urls]])


def sample(count: int, most: int = SAFETY_SAMPLES) -> list[int]:
    """Up to `most` evenly spaced indices of `count` frames, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def encode_mp4(frames: list[Any], fps: int) -> bytes:
    """H.264 in an mp4 container, in memory; frame sides are even (multiples of 8)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buf.getvalue()


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The SVD config measured in ../shared/notes/tiny-models-diffusion.md, with a 4-block temporal
# VAE so the latent factor is the real 8: 25 frames at 64x64 and 2 steps take under 1 s.

def tiny_svd_pipeline() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8,
        out_channels=4, down_block_types=("CrossAttnDownBlockSpatioTemporal",
                                          "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=96, addition_time_embed_dim=32, num_frames=4,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
        latent_channels=4, layers_per_block=1, scaling_factor=0.18215,
    )
    # SVD resizes its input to 224x224 for the CLIP image encoder, whatever the frame size.
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, image_size=224, patch_size=32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
        sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        diffusion.save_pipeline(tiny_svd_pipeline(), folder)


def working_memory(entry: ModelEntry, files: ModelFiles, request: ImageToVideoParams,
                   float_bytes: int) -> int:
    options = Options.of(entry)
    frames = options.num_frames or 25
    width, height = frame_size(request)
    pixels = width * height
    # SVD guides every frame (a batch of 2 x frames) and decodes decode_chunk_size at a time.
    unet, vae = diffusion.activation_widths(entry, files)
    return wm.diffusion(2 * frames, pixels // 64, min(options.decode_chunk_size, frames) * pixels,
                        float_bytes, unet, vae_per_pixel=vae)


def largest_fitting(entry: ModelEntry, request: ImageToVideoParams, fraction: float) -> str:
    return wm.square_hint(*frame_size(request), fraction, "frames")


def sample_request(scale: Scale) -> Sample:
    """A clip from a noise image of the scale's size (unset: SVD's own 1024x576)."""
    side = (scale.size, scale.size) if scale.size else (1024, 576)
    sized = {"width": side[0], "height": side[1]} if scale.size else {}
    return Sample({"seed": 1, "model_id": scale.model, "num_inference_steps": scale.steps,
                   **sized}, uploads={"image": NoiseImage(*side)}, params={"image_size": side})
