"""Segment objects in an image.

SAM 2 (Segment Anything 2): point, box and low-res mask prompts in, masks out, as the reference
runner's SAM2ImagePredictor answers them: every mask at the input image's size (logits when
`return_logits` is true, the contract's default; 0/1 otherwise), sorted by descending predicted
IoU, with the low-resolution logits (256x256 for the real models) that a client can send back as
`mask_input`. Each of `masks`, `scores` and `logits` is a JSON array string.

Two loaders, by the entry's `kind` in models.yaml:
- `sam2-hf`: transformers' `Sam2Model` on a Hugging Face format snapshot (config.json +
  safetensors; `sam2` and `sam2_video` configs both load). No torchvision: the resize, the
  ImageNet normalisation and the mask upsampling are done here, as the official predictor does
  them. This is the CPU tiny mode's loader too.
- `sam2-pt`: the `sam2` package's SAM2ImagePredictor on an official `.pt` checkpoint and its
  hydra yaml. The package imports torchvision, so of the images only segment-anything-2's
  serves it; the CPU test environment installs it without torchvision and stands in for the
  three transforms it uses.
The kind names the preferred format; a snapshot that lacks it but holds the other one (an
operator's disk filled for the reference runner holds only the `.pt` and its yaml) is loaded
with the other loader, and the log says so.

Requests differ from the reference in what is checked before the model runs (each a 400 naming
the field): JSON that does not parse or has the wrong shape, points or boxes outside the image,
labels other than 0/1, and a request with no prompt at all (the reference answers that with an
unprompted guess of the decoder, which segments nothing in particular). Masks are 0/1 rather
than Python's True/False, so the strings parse as JSON; logits are rounded to 3 decimals (the
model computes them in bf16, about 3 significant digits), a third of the bytes, which also keeps
a 1x256x256 `mask_input` echoed back from `logits` under the 1 MiB form-field limit.

Several prompts on one image (a click, then a refinement) pay for the image encoder once: the
embeddings of the last few images are kept on the model, keyed by a hash of the pixels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import _working_memory as wm

# The names below are the package's face: the runner reads the pipeline interface from here,
# and tests and scripts reach the parts as `sam2.X`, as when this was one module.
from pipelines.segment_anything_2._entry_options import DEFAULT_EMBEDDING_CACHE, Options
from pipelines.segment_anything_2._hf_backend import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOGIT_CLAMP,
    TransformersSam2,
    transformers_model,
)
from pipelines.segment_anything_2._masks import LOGIT_DECIMALS, PAD, json_array
from pipelines.segment_anything_2._prompts import (
    MAX_POINTS,
    Prompts,
    json_numbers,
    parse_box,
    parse_mask_input,
    parse_point_coords,
    parse_point_labels,
    parse_prompts,
    to_fractions,
)
from pipelines.segment_anything_2._pt_backend import (
    OfficialSam2,
    official_model,
    official_predictor,
    one_file,
    sam2_available,
)
from pipelines.segment_anything_2._segmenter import EmbeddingCache, Segmenter
from pipelines.segment_anything_2._tiny import (
    TINY_OFFICIAL_YAML,
    build_tiny,
    tiny_parts,
    tiny_transformers_model,
)
from pipelines.segment_anything_2._wire import MasksResponse, SegmentAnything2Params
from runner.context import RunContext
from runner.device import Device, move_model
from runner.errors import InferenceError, ModelLoadError
from runner.hub import ModelFiles
from runner.media import decode_image
from runner.registry import ModelEntry
from runner.sample import NoiseImage, Sample, Scale

__all__ = [
    # the pipeline interface
    "NAME", "REQUIRES", "Options", "Request", "Response", "build_tiny", "load", "move", "run",
    "warm_up", "working_memory",
    # the parts, as when this was one module
    "DEFAULT_EMBEDDING_CACHE", "IMAGENET_MEAN", "IMAGENET_STD", "LOGIT_CLAMP", "LOGIT_DECIMALS",
    "MAX_POINTS", "PAD", "TINY_OFFICIAL_YAML", "EmbeddingCache", "MasksResponse",
    "OfficialSam2", "Prompts", "SegmentAnything2Params", "Segmenter", "TransformersSam2",
    "json_array", "json_numbers", "official_model", "official_predictor", "one_file",
    "parse_box", "parse_mask_input", "parse_point_coords", "parse_point_labels",
    "parse_prompts", "sam2_available", "snapshot_format", "tiny_parts",
    "tiny_transformers_model", "to_fractions", "transformers_model",
]

NAME = "segment-anything-2"
REQUIRES = ("transformers>=4.56",)  # Sam2Model first shipped in 4.56
log = logging.getLogger(__name__)

Request = SegmentAnything2Params
Response = MasksResponse


# -- loading -----------------------------------------------------------------------------------

def snapshot_format(folder: Path, kind: str) -> str:
    """Which loader reads `folder`: the entry's kind when its files are there (and, for
    sam2-pt, the sam2 package is installed), else the other format if present."""
    readable = {
        "sam2-hf": (folder / "config.json").is_file() and any(folder.glob("*.safetensors")),
        "sam2-pt": any(folder.glob("*.pt")) and sam2_available(),
    }
    other = "sam2-pt" if kind == "sam2-hf" else "sam2-hf"
    if readable[kind]:
        return kind
    if readable[other]:
        log.warning("no readable %s files in %s; loading its %s files instead", kind, folder,
                    other)
        return other
    if any(folder.glob("*.pt")):
        raise ModelLoadError(f"{folder} holds only an official .pt checkpoint, which needs the "
                             "`sam2` package and torchvision (the segment-anything-2 image); or "
                             "download the Hugging Face format "
                             "files (config.json, *.safetensors)")
    raise ModelLoadError(f"{folder} holds neither a Hugging Face format SAM2 (config.json, "
                         "*.safetensors) nor an official .pt checkpoint")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> Segmenter:
    if entry.kind not in ("sam2-hf", "sam2-pt"):
        raise ModelLoadError(f"{entry.id}: unknown kind {entry.kind!r} for {NAME}")
    folder = files.folder(entry.main.repo, entry.main.revision)
    cache_size = Options.of(entry).embedding_cache
    if snapshot_format(folder, entry.kind) == "sam2-pt":
        return OfficialSam2(official_predictor(folder, entry, device), entry.id, device,
                            cache_size)
    return TransformersSam2(transformers_model(folder, entry, device), entry.id, device,
                            cache_size)


# -- one request -------------------------------------------------------------------------------

def run(model: Segmenter, request: SegmentAnything2Params, ctx: RunContext) -> MasksResponse:
    import torch

    # 1. Decode the upload: RGB, EXIF orientation applied; 400 if undecodable or too large.
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    pixels = np.array(image)  # (H, W, 3) uint8, writable (torch shares its memory)
    height, width = pixels.shape[:2]
    # 2. The prompts: JSON strings as go-livepeer sends them, checked against the image and the
    #    model's mask size; 400 naming the field. Coordinates become fractions of the image.
    prompts = parse_prompts(request, width, height, model.mask_size)
    with torch.inference_mode():
        # 3. The image embedding: from the cache when this image (same pixels, same model) was
        #    embedded recently, else the image encoder ("embed" stage).
        embedding = model.embedding(pixels, ctx)
        # 4. Prompt encoder and mask decoder (bf16 autocast on CUDA), mask logits upsampled to
        #    the input size.
        with ctx.stage("segment"):
            masks, scores, low_res = model.decode(embedding, prompts, request.multimask_output,
                                                  (height, width))
    # 5. Best mask first, as the reference sorts them.
    order = np.argsort(-scores, kind="stable")
    masks, scores, low_res = masks[order], scores[order], low_res[order]
    # 6. JSON array strings: masks as logits (return_logits) or 0/1, scores, low-res logits.
    with ctx.stage("serialize"):
        if not (np.isfinite(masks).all() and np.isfinite(scores).all()):
            raise InferenceError("the model produced non-finite mask logits")
        mask_json = (json_array(masks, LOGIT_DECIMALS) if request.return_logits
                     else json_array((masks > 0).astype(np.uint8)))
        return MasksResponse(masks=mask_json, scores=json.dumps(scores.tolist()),
                             logits=json_array(low_res, LOGIT_DECIMALS))


def move(model: Segmenter, target: Any) -> None:
    """The cache's demotion to CPU RAM and promotion back: the network moves, and the image
    embeddings on the device are dropped, so a demotion frees all of the model's memory."""
    model.forget_images()
    move_model(model, target)


def warm_up(model: Segmenter, entry: ModelEntry) -> None:
    """TORCH_COMPILE: one embedding at load (every input is resized to the model's square
    size, so one shape covers all requests)."""
    model.embed(np.zeros((64, 64, 3), dtype=np.uint8))


def working_memory(entry: ModelEntry, files: ModelFiles, request: Any, float_bytes: int) -> int:
    """The image encoder at the model's fixed input size dominates: hiera-large's figure at
    1024x1024 and 144 channels in its first stage, scaled by this model's input pixels and
    channels (config.json, or the official format's yaml)."""
    found = wm.model_config(files, entry.main.repo, entry.main.revision)
    if not found:
        try:  # the yaml the official loader reads (options.config, or the only one)
            yaml = one_file(files.folder(entry.main.repo, entry.main.revision), "*.yaml",
                            Options.of(entry).config)
        except ModelLoadError:
            yaml = None
        found = wm.config(yaml.parent, yaml.name) if yaml is not None else {}
    side = wm.width(found, 1024, "image_size", "vision_config.backbone_config.image_size",
                    "model.image_size")
    channels = wm.width(found, 144, "vision_config.backbone_config.hidden_size",
                        "model.image_encoder.trunk.embed_dim")
    return wm.fixed(1024, float_bytes, scale=side * side * channels)


def sample_request(scale: Scale) -> Sample:
    """One point at the centre of a noise image of the scale's size (unset: 1024x1024); the
    image changes with `scale.index`, so the embedding cache never hits and each request pays
    for the image encoder."""
    side = (scale.size, scale.size) if scale.size else (1024, 1024)
    return Sample({"model_id": scale.model, "point_coords": f"[[{side[0] // 2},{side[1] // 2}]]",
                   "point_labels": "[1]"},
                  uploads={"image": NoiseImage(*side, seed=scale.index)},
                  params={"image_size": side, "seed": scale.index})
