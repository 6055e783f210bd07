"""Shared by the diffusion pipelines: loading, schedulers, seeds, prompts, LoRAs, and the tiny
random-weight checkpoints for CPU mode. No routes or request models live here."""

from __future__ import annotations

import functools
import json
import math
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines import _working_memory as wm
from pipelines._tokens import byte_symbols
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.options import Options as BaseOptions
from runner.protocol import ImageResponse, Media
from runner.registry import ModelEntry

MAX_LORAS = 4
PROMPT_SLOTS = ("prompt", "prompt_2", "prompt_3")
Scheduler = Literal["euler-trailing", "euler-ancestral", "dpmpp-sde-karras"]


class DiffusionOptions(BaseOptions):
    """models.yaml `options:` of the SD/SDXL pipelines (text-to-image's `Options`; those of
    image-to-image and upscale add their input caps)."""

    scheduler: Scheduler | None = Field(
        None, description="The sampler swapped in at load (euler-trailing for SDXL-Lightning); "
        "default: the checkpoint's own.")


@dataclass
class DiffusionModel:
    """A loaded diffusers pipeline plus the LoRA adapters already attached to it."""

    pipe: Any
    device: Device
    adapters: set[str] = field(default_factory=set)
    fused: bool = False  # q, k, v projections fused into one matmul (until a LoRA arrives)


# -- loading -------------------------------------------------------------------------------

def variant_if_present(folder: Path, variant: str | None) -> str | None:
    """Ask for the fp16 files only where the snapshot has them; the dtype stays half either
    way, so a missing variant never means serving fp32."""
    if variant and any(folder.rglob(f"*.{variant}.safetensors")):
        return variant
    return None


def quiet_loading() -> None:
    """Progress bars from from_pretrained only clutter a server's log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def finish_loading(pipe: Any, device: Device, scheduler: str | None,
                   channels_last: bool = True, compile: bool = False) -> DiffusionModel:
    set_scheduler(pipe, scheduler)
    pipe.to(device.torch)
    pipe.set_progress_bar_config(disable=True)
    model = DiffusionModel(pipe, device)
    if device.is_cuda:
        fuse_attention(model)
    if channels_last and device.is_cuda:
        # NHWC convolutions are the fast path of cuDNN's fp16 kernels on tensor cores.
        import torch

        for name in ("unet", "vae"):
            if (module := getattr(pipe, name, None)) is not None:
                module.to(memory_format=torch.channels_last)
    if compile:
        # In place, so LoRA adapters, tier moves and the cache's measurements see the same
        # modules; the first call at each size compiles (warm_up does it at load).
        pipe.unet.compile()
        pipe.vae.decoder.compile()
    return model


def fuse_attention(model: DiffusionModel) -> None:
    """One matmul for q, k and v in every self-attention of the UNet and VAE (for k and v in
    cross-attention), where the pipeline supports it."""
    if not model.fused and callable(getattr(model.pipe, "fuse_qkv_projections", None)):
        model.pipe.fuse_qkv_projections()
        for attn in _attentions(model.pipe):
            _empty_separate_layers(attn)
        model.fused = True


def unfuse_attention(model: DiffusionModel) -> None:
    """LoRA adapters wrap the separate q, k, v layers, which fused attention bypasses: a model
    unfuses for good before its first adapter."""
    if model.fused:
        for attn in _attentions(model.pipe):
            _split_fused_layers(attn)
        model.pipe.unfuse_qkv_projections()  # diffusers' own processors back
        model.fused = False


# The layers diffusers' fuse_projections concatenates (rows in this order) into each fused one;
# FusedAttnProcessor2_0 reads only the fused ones, and to_q in cross-attention.
FUSED_LAYERS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}


def _attentions(pipe: Any) -> Any:
    from diffusers.models.attention_processor import Attention

    for name in ("unet", "vae"):
        if (module := getattr(pipe, name, None)) is not None:
            yield from (m for m in module.modules() if isinstance(m, Attention))


def _empty_separate_layers(attn: Any) -> None:
    """diffusers keeps the separate layers beside their fused copy (+25 % UNet parameters on
    SDXL, which the cache's size estimate from the files does not expect). They keep empty
    parameters instead: those follow .to() moves like any other, and the layers' out_features
    still say where to split the fused weights when unfusing."""
    import torch

    for fused, parts in FUSED_LAYERS.items():
        if getattr(attn, fused, None) is not None:
            for layer in (getattr(attn, part) for part in parts):
                for name, p in list(layer.named_parameters(recurse=False)):
                    empty = p.detach().new_empty((0, *p.shape[1:]))
                    setattr(layer, name, torch.nn.Parameter(empty, p.requires_grad))


def _split_fused_layers(attn: Any) -> None:
    """The separate layers get their rows of the fused weights (copies, so nothing keeps the
    fused storage alive) and the fused layer goes."""
    import torch

    for fused, parts in FUSED_LAYERS.items():
        if (joined := getattr(attn, fused, None)) is None:
            continue
        layers = [getattr(attn, part) for part in parts]
        with torch.no_grad():
            for name, p in list(joined.named_parameters(recurse=False)):
                pieces = p.split([layer.out_features for layer in layers])
                for layer, piece in zip(layers, pieces, strict=True):
                    setattr(layer, name, torch.nn.Parameter(piece.clone(), p.requires_grad))
        delattr(attn, fused)
        attn.fused_projections = False


def warm_up(model: DiffusionModel, entry: ModelEntry) -> None:
    """One generation at the entry's served size and guidance (its models.yaml defaults), so
    TORCH_COMPILE's compilation happens at load rather than on a client's request."""
    import torch
    from PIL import Image

    values = {**entry.defaults, **entry.fixed}
    side = native_side(entry)
    width, height = int(values.get("width", side)), int(values.get("height", side))
    call = {"width": width, "height": height, "image": Image.new("RGB", (width, height)),
            "num_inference_steps": int(values.get("num_inference_steps") or 2),
            **{k: values[k] for k in ("guidance_scale", "image_guidance_scale", "strength")
               if values.get(k) is not None}}
    with torch.inference_mode():
        model.pipe(prompt="warm-up", **accepted(model.pipe, call))


def native_side(entry: ModelEntry) -> int:
    """The side of the square images the entry's family was trained at."""
    return 1024 if entry.kind.startswith("sdxl") else 512


def set_scheduler(pipe: Any, name: str | None) -> None:
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    config = pipe.scheduler.config
    if name is None:
        return
    if name == "euler-trailing":  # what SDXL-Lightning was distilled with
        pipe.scheduler = EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    elif name == "euler-ancestral":
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
    elif name == "dpmpp-sde-karras":  # DPM++ SDE Karras without the torchsde dependency
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    else:
        raise ValueError(f"unknown scheduler {name!r} in models.yaml")


AUTO_PIPELINES = {"text-to-image": "AutoPipelineForText2Image",
                  "image-to-image": "AutoPipelineForImage2Image"}
LIGHTNING_PIPELINES = {"text-to-image": "StableDiffusionXLPipeline",
                       "image-to-image": "StableDiffusionXLImg2ImgPipeline"}


def from_folder(cls: Any, entry: ModelEntry, files: ModelFiles, device: Device,
                **kwargs: Any) -> Any:
    """`cls.from_pretrained` on the entry's snapshot at the serving dtype, fp16 files where
    the snapshot has them."""
    quiet_loading()
    folder = files.folder(entry.main.repo, entry.main.revision)
    return cls.from_pretrained(folder, dtype=device.dtype(entry.dtype),
                               variant=variant_if_present(folder, entry.variant), **kwargs)


def load_family(entry: ModelEntry, files: ModelFiles, device: Device,
                options: DiffusionOptions) -> DiffusionModel:
    """The SD/SDXL families for text-to-image and image-to-image, by the entry's kind:
    `sd`, `sdxl` (auto pipelines), `sdxl-lightning` (a step-distilled UNet file on the SDXL
    base) and `pix2pix` (InstructPix2Pix); `options` are the calling pipeline's, typed."""
    import diffusers

    parts: dict[str, Any] = {}
    if entry.kind in ("sd", "pix2pix"):  # images are checked by the runner's batched checker
        parts.update(safety_checker=None, requires_safety_checker=False)
    if "vae" in entry.components:  # the fp16-fix VAE: decodes in fp16 without an fp32 upcast
        source = entry.components["vae"]
        parts["vae"] = diffusers.AutoencoderKL.from_pretrained(
            files.folder(source.repo, source.revision), dtype=device.dtype(entry.dtype))
    if entry.kind == "sdxl-lightning":
        cls = getattr(diffusers, LIGHTNING_PIPELINES[entry.pipeline])
        base = files.folder(entry.main.repo, entry.main.revision)
        parts["unet"] = lightning_unet(entry, files, base, device)
    elif entry.kind == "pix2pix":
        cls = diffusers.StableDiffusionInstructPix2PixPipeline
    else:
        cls = getattr(diffusers, AUTO_PIPELINES[entry.pipeline])
    pipe = from_folder(cls, entry, files, device, **parts)
    return finish_loading(pipe, device, options.scheduler, compile=device.compile)


def lightning_unet_file(entry: ModelEntry) -> tuple[str, str, str]:
    """Repo, file and revision of an sdxl-lightning entry's UNet (`components.unet.file`)."""
    source = entry.components.get("unet")
    if source is None or source.file is None:
        raise ValueError(f"models.yaml: {entry.id} (sdxl-lightning) names no components.unet.file")
    return source.repo, source.file, source.revision


def lightning_unet(entry: ModelEntry, files: ModelFiles, base: Path, device: Device) -> Any:
    """The step-distilled UNet file on the base SDXL UNet architecture, built without
    allocating random weights first."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    weights = files.file(*lightning_unet_file(entry))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    unet.load_state_dict(load_file(weights), assign=True)
    return unet.to(device.torch, device.dtype(entry.dtype))


def activation_widths(entry: ModelEntry, files: ModelFiles,
                      per_latent_pixel: float = wm.UNET_BYTES_PER_LATENT_PIXEL,
                      channels: int = wm.UNET_CHANNELS) -> tuple[float, float]:
    """The denoiser's working bytes per latent pixel and the VAE's per decoded pixel, for this
    entry's architecture (its unet/ and vae/ configs, the replacing VAE's where components name
    one), from the family's reference figures (`per_latent_pixel` at `channels`)."""
    main = entry.main
    unet = wm.model_config(files, main.repo, main.revision, "unet")
    source = entry.components.get("vae")
    vae = wm.model_config(files, source.repo, source.revision) if source is not None \
        else wm.model_config(files, main.repo, main.revision, "vae")
    return (per_latent_pixel * wm.width(unet, channels, "block_out_channels"),
            wm.VAE_BYTES_PER_PIXEL * wm.width(vae, wm.VAE_CHANNELS, "block_out_channels"))


# -- requests ------------------------------------------------------------------------------

def seeds(seed: int | None, count: int) -> list[int]:
    """`seed, seed+1, ...` per image; a random 32-bit seed when the client sent none."""
    first = random.randrange(2**32) if seed is None else seed
    return [first + i for i in range(count)]


def generators(device: Device, image_seeds: list[int]) -> list[Any]:
    import torch

    return [torch.Generator(device.torch).manual_seed(s) for s in image_seeds]


def prompt_kwargs(pipe: Any, prompt: str, negative: str) -> dict[str, str]:
    """`a|b` feeds prompt and prompt_2 (SDXL's second text encoder); a model with a single
    text encoder gets the text unsplit."""
    params = call_params(pipe)
    slots = [s for s in PROMPT_SLOTS if s in params]
    kwargs: dict[str, str] = {}
    for kind, text in (("", prompt), ("negative_", negative)):
        parts = [p.strip() for p in text.split("|")] if len(slots) > 1 else [text]
        if len(parts) > len(slots):
            raise BadRequest(f"this model takes at most {len(slots)} '|'-separated "
                             f"{kind.replace('_', ' ')}prompts, got {len(parts)}")
        for slot, part in zip(slots, parts, strict=False):
            if part or not kind:
                kwargs[kind + slot] = part
    return kwargs


def accepted(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments this pipeline's __call__ takes (image_guidance_scale only
    means something to InstructPix2Pix, strength only to img2img)."""
    params = call_params(pipe)
    return {k: v for k, v in kwargs.items() if k in params}


def call_params(pipe: Any) -> frozenset[str]:
    """The parameter names of the pipeline's __call__."""
    cls: type = type(pipe)
    return _call_params(cls)


@functools.cache
def _call_params(cls: type) -> frozenset[str]:
    """Read once per class: building a signature costs more than the rest of a request's own
    bookkeeping."""
    import inspect

    return frozenset(inspect.signature(cls.__call__).parameters)


def generate_images(model: DiffusionModel, request: Any, ctx: RunContext,
                    **inputs: Any) -> ImageResponse:
    """The run shared by the image pipelines; `inputs` are the task's own call arguments
    (size for text-to-image; image and strength for image-to-image)."""
    import torch

    pipe = model.pipe
    # 1. LoRAs: parsed and checked first, so a bad one costs no GPU time.
    activate_loras(model, parse_loras(request.loras), ctx.files)
    # 2. Prompts, one per text encoder, and one seed per image.
    prompts = prompt_kwargs(pipe, request.prompt, request.negative_prompt)
    image_seeds = seeds(request.seed, request.num_images_per_prompt)
    # 3. Denoise all images in one batched call (CFG branches batched by diffusers).
    call = accepted(pipe, dict(
        inputs, guidance_scale=request.guidance_scale,
        num_inference_steps=request.num_inference_steps,
        num_images_per_prompt=request.num_images_per_prompt,
        generator=generators(model.device, image_seeds),
        callback_on_step_end=ctx.step_callback))  # stops when the client has gone
    with ctx.stage("denoise"), torch.inference_mode():
        images = pipe(**prompts, **call).images
    # 4. Safety check and PNG encoding.
    return image_response(images, image_seeds, ctx)


def image_response(images: list[Any], image_seeds: list[int],
                   ctx: RunContext) -> ImageResponse:
    """One batched safety check (the operator's policy applied to flagged images), then PNG
    data URLs; called in the worker thread, off the event loop."""
    images, flags = ctx.check_safety(images)
    with ctx.stage("encode"):
        return ImageResponse(images=[
            Media(url=ctx.encode_png(img), seed=seed, nsfw=flag)
            for img, seed, flag in zip(images, image_seeds, flags, strict=True)
        ])


def fit_image(image: Any, multiple: int, max_pixels: int) -> Any:
    """Scaled down (never up) to at most `max_pixels`, then each side cut to a multiple of
    `multiple` (at least one multiple)."""
    from PIL import Image

    scale = min(1.0, math.sqrt(max_pixels / (image.width * image.height)))
    width = max(multiple, int(image.width * scale) // multiple * multiple)
    height = max(multiple, int(image.height * scale) // multiple * multiple)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


# -- LoRAs ---------------------------------------------------------------------------------

def parse_loras(text: str) -> dict[str, float]:
    """`{"org/adapter": weight, ...}` from the request's JSON string; 400 on anything else."""
    from runner.hub import is_repo_id

    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"loras is not valid JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # too deeply nested, or too many digits
        raise BadRequest(f"loras is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BadRequest('loras must be a JSON object like {"org/adapter": 1.0}')
    if len(value) > MAX_LORAS:
        raise BadRequest(f"at most {MAX_LORAS} LoRAs per request, got {len(value)}")
    for name, weight in value.items():
        if not is_repo_id(name):
            raise BadRequest(f"LoRA {name!r} is not a model id")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0 <= weight <= sys.float_info.max:  # NaN, inf and huge ints too
            raise BadRequest(f"LoRA weight for {name!r} must be a finite non-negative number")
    return {name: float(weight) for name, weight in value.items()}


def adapter_name(repo: str) -> str:
    return re.sub(r"\W", "_", repo)


def activate_loras(model: DiffusionModel, loras: dict[str, float], files: ModelFiles) -> None:
    """Attach requested adapters (once each, from MODEL_DIR only) and weight them for this
    request; with none requested, attached adapters are switched off."""
    pipe = model.pipe
    if loras:
        unfuse_attention(model)
    for repo in loras:
        if adapter_name(repo) not in model.adapters:
            _attach(model, repo, files)
    if loras:
        pipe.enable_lora()
        pipe.set_adapters([adapter_name(r) for r in loras], list(loras.values()))
    elif model.adapters:
        pipe.disable_lora()


def _attach(model: DiffusionModel, repo: str, files: ModelFiles) -> None:
    if not files.has(repo):
        raise BadRequest(f"LoRA {repo} is not available on this runner")
    folder = files.folder(repo)
    weights = sorted(folder.glob("*.safetensors"))
    name = adapter_name(repo)
    kwargs = {"weight_name": weights[0].name} if len(weights) == 1 else {}
    try:
        model.pipe.load_lora_weights(folder, adapter_name=name, **kwargs)
    except Exception as exc:  # wrong base model, corrupt file: the client's choice of LoRA
        _drop_adapter(model.pipe, name)
        raise BadRequest(f"LoRA {repo} does not fit this model: {exc}") from exc
    model.adapters.add(name)


def _drop_adapter(pipe: Any, name: str) -> None:
    try:
        pipe.delete_adapters(name)
    except Exception:  # nothing was attached
        pass


# -- tiny checkpoints for CPU mode ---------------------------------------------------------
# Configs measured in ../shared/notes/tiny-models-diffusion.md: a 4-block VAE keeps the real
# latent factor of 8, so request validation (multiples of 8) is the same as on real models.

TINY_VOCAB = 523


def tiny_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP BPE tokenizer over the byte alphabet plus a few merges, eos as the highest id."""
    from transformers import CLIPTokenizer

    chars = byte_symbols()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


def tiny_text_encoder(projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=TINY_VOCAB, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
        layer_norm_eps=1e-5, bos_token_id=TINY_VOCAB - 2, eos_token_id=TINY_VOCAB - 1,
        pad_token_id=TINY_VOCAB - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
        sample_size=64, scaling_factor=scaling_factor,
    )


def tiny_sdxl_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )


def tiny_sd_unet(in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
        in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8,
    )


def sd_scheduler_config() -> dict[str, Any]:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1)


def tiny_sdxl_pipeline() -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025), text_encoder=tiny_text_encoder(),
        text_encoder_2=tiny_text_encoder(projection=True), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(pad_token="!"), unet=tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**sd_scheduler_config(), prediction_type="epsilon"),
        image_encoder=None, feature_extractor=None,
    )


def tiny_sd_pipeline() -> Any:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=tiny_vae(0.18215), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        unet=tiny_sd_unet(), scheduler=PNDMScheduler(**sd_scheduler_config(),
                                                     skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Any, folder: Path) -> None:
    """save_pretrained, with the PIL image-processor fallback renamed to the class real
    checkpoints name, so the folder loads anywhere."""
    pipe.save_pretrained(folder)
    index = folder / "model_index.json"
    index.write_text(index.read_text().replace("CLIPImageProcessorPil", "CLIPImageProcessor"))


def tiny_pix2pix_pipeline() -> Any:
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    torch.manual_seed(0)
    return StableDiffusionInstructPix2PixPipeline(
        vae=tiny_vae(0.18215), text_encoder=tiny_text_encoder(), tokenizer=tiny_tokenizer(),
        unet=tiny_sd_unet(in_channels=8), scheduler=EulerAncestralDiscreteScheduler(
            **sd_scheduler_config()),
        safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


TINY_FAMILIES = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline,
                 "sdxl-lightning": tiny_sdxl_pipeline, "pix2pix": tiny_pix2pix_pipeline}


def build_tiny_family(entry: ModelEntry, model_dir: Path) -> None:
    """Random weights in the exact layout `load_family` reads for this entry's kind."""
    from safetensors.torch import save_file

    if not ModelFiles(model_dir).has(entry.main.repo):
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            save_pipeline(TINY_FAMILIES[entry.kind](), folder)
    vae = entry.components.get("vae")
    if vae is not None and not ModelFiles(model_dir).has(vae.repo):
        with writing_snapshot(model_dir, vae.repo) as folder:
            fixed = tiny_vae(scaling_factor=0.13025)
            fixed.register_to_config(force_upcast=False)  # what the fp16-fix VAE's config says
            fixed.save_pretrained(folder)
    if entry.kind == "sdxl-lightning":
        repo, file, _ = lightning_unet_file(entry)
        with writing_snapshot(model_dir, repo) as folder:
            save_file(tiny_sdxl_unet().state_dict(), folder / file)
