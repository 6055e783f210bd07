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
  hydra yaml. It needs torchvision, so it runs only in the GPU image; the CPU environment never
  exercises it.
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

import hashlib
import importlib.util
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from pipelines import _working_memory as wm
from pipelines._fields import ModelId
from runner.device import Device, move_model
from runner.errors import BadRequest, InferenceError, ModelLoadError
from runner.hub import ModelFiles, writing_snapshot
from runner.media import decode_image
from runner.protocol import Upload
from runner.registry import ModelEntry

NAME = "segment-anything-2"
REQUIRES = ("transformers>=4.56",)  # Sam2Model first shipped in 4.56
log = logging.getLogger(__name__)

MAX_POINTS = 64  # point prompts per request; real clicks number a handful
DEFAULT_EMBEDDING_CACHE = 4  # images whose embeddings are kept (models.yaml `embedding_cache`)
LOGIT_DECIMALS = 3
LOGIT_CLAMP = 32.0  # the official predictor clamps the low-res logits to +-32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentAnything2Params(BaseModel):
    image: Upload = Field(description="Image to segment.")
    model_id: ModelId = ""
    point_coords: str | None = Field(None, description=(
        "Nx2 array of point prompts to the model, where each point is in (X,Y) in pixels."))
    point_labels: str | None = Field(None, description=(
        "Labels for the point prompts, where 1 indicates a foreground point and 0 indicates a "
        "background point."))
    box: str | None = Field(None, description=(
        "A length 4 array given as a box prompt to the model, in XYXY format."))
    mask_input: str | None = Field(None, description=(
        "A low-resolution mask input to the model, typically from a previous prediction "
        "iteration, with the form 1xHxW (H=W=256 for SAM)."))
    multimask_output: bool = Field(True, description=(
        "If true, the model will return three masks for ambiguous input prompts, often "
        "producing better masks than a single prediction."))
    return_logits: bool = Field(True, description=(
        "If true, returns un-thresholded mask logits instead of a binary mask."))
    normalize_coords: bool = Field(True, description=(
        "If true, the point coordinates will be normalized to the range [0,1], with "
        "point_coords expected to be with respect to image dimensions."))


class MasksResponse(BaseModel):
    """Response model for object segmentation."""

    masks: str = Field(description="The generated masks.")
    scores: str = Field(description="The model's confidence scores for each generated mask.")
    logits: str = Field(description="The raw, unnormalized predictions (logits) for the masks.")


Request = SegmentAnything2Params
Response = MasksResponse


# -- prompts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prompts:
    """A request's prompts, checked; coordinates as fractions of the image's width and height
    (what both backends scale to their own input size)."""

    points: np.ndarray | None = None  # (N, 2) float32, x and y in [0, 1]
    labels: np.ndarray | None = None  # (N,) int64, 0 background / 1 foreground
    box: np.ndarray | None = None  # (4,) float32, x1 y1 x2 y2 in [0, 1]
    mask: np.ndarray | None = None  # (1, M, M) float32 low-res logits


def json_numbers(field: str, text: str | None) -> np.ndarray | None:
    """A JSON array of numbers sent as a string (`"[[10,20]]"`); None when absent or empty."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{field} is not valid JSON: {exc}") from exc
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"{field} must be a rectangular array of numbers") from exc
    if array.dtype.kind not in "iuf":
        raise BadRequest(f"{field} must be an array of numbers")
    if not np.isfinite(array).all():
        raise BadRequest(f"{field} holds a number that is not finite")
    return array


def parse_point_coords(text: str | None) -> np.ndarray | None:
    coords = json_numbers("point_coords", text)
    if coords is None:
        return None
    if coords.ndim != 2 or coords.shape[1] != 2 or not 1 <= len(coords) <= MAX_POINTS:
        raise BadRequest(f"point_coords must be an Nx2 array of [x, y] points (1 <= N <= "
                         f"{MAX_POINTS}), e.g. [[10,20]]; got shape {list(coords.shape)}")
    return coords.astype(np.float64)


def parse_point_labels(text: str | None, points: int) -> np.ndarray | None:
    labels = json_numbers("point_labels", text)
    if labels is None:
        return None
    if labels.shape != (points,):
        raise BadRequest(f"point_labels must be an array of {points} labels, one per point of "
                         f"point_coords, e.g. [1]; got shape {list(labels.shape)}")
    if not np.isin(labels, (0, 1)).all():
        raise BadRequest("point_labels must be 1 (foreground) or 0 (background)")
    return labels.astype(np.int64)


def parse_box(text: str | None) -> np.ndarray | None:
    box = json_numbers("box", text)
    if box is None:
        return None
    if box.shape not in ((4,), (1, 4)):
        raise BadRequest(f"box must be 4 numbers [x1, y1, x2, y2]; got shape {list(box.shape)}")
    box = box.reshape(4).astype(np.float64)
    if box[2] < box[0] or box[3] < box[1]:
        raise BadRequest("box must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return box


def parse_mask_input(text: str | None, mask_size: tuple[int, int]) -> np.ndarray | None:
    mask = json_numbers("mask_input", text)
    if mask is None:
        return None
    if mask.shape != (1, *mask_size):
        shape = "x".join(map(str, (1, *mask_size)))
        raise BadRequest(f"mask_input must be a {shape} array of low-res mask logits (the "
                         f"`logits` of an earlier answer); got shape {list(mask.shape)}")
    return mask.astype(np.float32)


def to_fractions(field: str, xy: np.ndarray, width: int, height: int,
                 normalized: bool) -> np.ndarray:
    """Pixels (normalize_coords true, the default) or fractions in [0, 1] (false), as in the
    reference's SAM2ImagePredictor, to fractions; anything outside the image is a 400."""
    fractions = xy if normalized else xy / np.array([width, height], dtype=np.float64)
    if fractions.min() < 0 or fractions.max() > 1:
        limits = "[0, 1]" if normalized else f"0 <= x <= {width} and 0 <= y <= {height}"
        raise BadRequest(f"{field} lies outside the {width}x{height} image: coordinates must "
                         f"be within {limits}" + ("" if normalized else " pixels"))
    return fractions.astype(np.float32)


def parse_prompts(request: SegmentAnything2Params, width: int, height: int,
                  mask_size: tuple[int, int]) -> Prompts:
    points = parse_point_coords(request.point_coords)
    labels = parse_point_labels(request.point_labels, 0 if points is None else len(points))
    box = parse_box(request.box)
    mask = parse_mask_input(request.mask_input, mask_size)
    if points is not None and labels is None:
        raise BadRequest("point_labels is required with point_coords: 1 for each foreground "
                         "point, 0 for each background point")
    if points is None and labels is not None:
        raise BadRequest("point_labels was sent without point_coords")
    if points is None and box is None and mask is None:
        raise BadRequest("no prompt: send point_coords with point_labels, a box, or a "
                         "mask_input")
    # normalize_coords true means "coordinates are pixels: normalise them" (the reference).
    already = not request.normalize_coords
    return Prompts(
        points=None if points is None else to_fractions("point_coords", points, width, height,
                                                        already),
        labels=labels,
        box=None if box is None else to_fractions("box", box.reshape(2, 2), width, height,
                                                  already).reshape(4),
        mask=mask,
    )


# -- the loaded model --------------------------------------------------------------------------

class EmbeddingCache:
    """Image embeddings of the last `size` images, least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Segmenter:
    """A loaded SAM2 (either backend) and its embedding cache. `embed` runs the image encoder;
    `decode` the prompt encoder and mask decoder, returning mask logits at the input size
    (C, H, W), scores (C,) and low-res logits (C, M, M), all float32 numpy."""

    def __init__(self, model_id: str, device: Device, mask_size: tuple[int, int],
                 cache_size: int):
        self.model_id = model_id
        self.device = device
        self.mask_size = mask_size
        self.embeddings = EmbeddingCache(cache_size)
        self.encoded = 0  # image-encoder runs: cache misses (tests and logs read it)

    def autocast(self):
        """bf16 autocast on CUDA, as the official predictor runs; nothing on CPU."""
        import torch

        if self.device.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def embedding(self, pixels: np.ndarray, ctx) -> Any:
        key = hashlib.sha256()
        key.update(f"{self.model_id}\0{pixels.shape}\0".encode())
        key.update(np.ascontiguousarray(pixels).data)
        digest = key.hexdigest()
        cached = self.embeddings.get(digest)
        if cached is not None:
            return cached
        with ctx.stage("embed"):
            embedding = self.embed(pixels)
            if self.device.is_cuda:
                import torch

                torch.cuda.synchronize(self.device.torch)  # so the stage times the encoder
        self.encoded += 1
        self.embeddings.put(digest, embedding)
        return embedding

    def forget_images(self) -> None:
        """Drop the device tensors kept for images already seen (moving them is not worth it:
        a miss recomputes them)."""
        self.embeddings.clear()

    def embed(self, pixels: np.ndarray) -> Any:
        raise NotImplementedError

    def decode(self, embedding: Any, prompts: Prompts, multimask: bool,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class TransformersSam2(Segmenter):
    """transformers' Sam2Model with the official predictor's pre- and post-processing (its
    Sam2Processor needs torchvision)."""

    def __init__(self, model: Any, model_id: str, device: Device, cache_size: int):
        config = model.config
        super().__init__(model_id, device, tuple(model.prompt_encoder.mask_input_size),
                         cache_size)
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.prompt_size = int(config.prompt_encoder_config.image_size)  # point coordinates
        side = config.vision_config.backbone_config.image_size
        self.pixel_size = (side, side) if isinstance(side, int) else tuple(side)  # (h, w)

    def embed(self, pixels: np.ndarray) -> list:
        import torch
        import torch.nn.functional as F

        # As SAM2Transforms: to [0, 1], resize to the model's square input (bilinear with
        # antialiasing, what torchvision's Resize does on tensors), ImageNet mean/std.
        x = torch.from_numpy(pixels).to(self.device.torch)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=self.pixel_size, mode="bilinear", align_corners=False,
                          antialias=True)
        # made per call, not held: a tensor attribute would stay on the GPU when the cache
        # moves the model to CPU RAM (only modules move)
        mean, std = (x.new_tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        x = ((x - mean) / std).to(self.dtype)
        with self.autocast():
            return self.model.get_image_embeddings(x)

    def decode(self, embedding: list, prompts: Prompts, multimask: bool,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        on = dict(device=self.device.torch)
        inputs: dict[str, Any] = {}
        if prompts.points is not None:  # (image, object, point, xy) in model input pixels
            inputs["input_points"] = torch.tensor(prompts.points * self.prompt_size, **on)[None,
                                                                                        None]
            inputs["input_labels"] = torch.tensor(prompts.labels, **on)[None, None]
        if prompts.box is not None:  # (image, box, xyxy)
            inputs["input_boxes"] = torch.tensor(prompts.box * self.prompt_size, **on)[None, None]
        if prompts.mask is not None:  # (image, 1, M, M)
            inputs["input_masks"] = torch.tensor(prompts.mask, **on)[None]
        with self.autocast():
            out = self.model(image_embeddings=embedding, multimask_output=multimask, **inputs)
        low = out.pred_masks[0, 0].float()  # (C, M, M) logits
        scores = out.iou_scores[0, 0].float()
        # No padding in SAM2's resize, so the low-res grid maps onto the whole image.
        full = F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0]
        low = low.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        return full.cpu().numpy(), scores.cpu().numpy(), low.cpu().numpy()


class OfficialSam2(Segmenter):
    """The `sam2` package's SAM2ImagePredictor. GPU image only (the package needs torchvision);
    nothing in the CPU test environment runs this class."""

    def __init__(self, predictor: Any, model_id: str, device: Device, cache_size: int):
        model = predictor.model
        super().__init__(model_id, device, tuple(model.sam_prompt_encoder.mask_input_size),
                         cache_size)
        self.predictor = predictor
        self._lock = threading.Lock()  # the predictor holds "the current image" as state

    def forget_images(self) -> None:
        super().forget_images()
        with self._lock:
            self.predictor.reset_predictor()  # it holds the last image's features

    def embed(self, pixels: np.ndarray) -> tuple:
        with self._lock, self.autocast():
            self.predictor.set_image(pixels)  # HxWx3 uint8 RGB
            return self.predictor._features, self.predictor._orig_hw

    def decode(self, embedding: tuple, prompts: Prompts, multimask: bool,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features, orig_hw = embedding
        predictor = self.predictor
        with self._lock, self.autocast():
            predictor._features, predictor._orig_hw = features, orig_hw
            predictor._is_image_set, predictor._is_batch = True, False
            # Fractions in [0, 1]: normalize_coords=False only scales them to the model size.
            masks, scores, low = predictor.predict(
                point_coords=prompts.points, point_labels=prompts.labels, box=prompts.box,
                mask_input=prompts.mask, multimask_output=multimask, return_logits=True,
                normalize_coords=False)
        return masks.astype(np.float32), scores.astype(np.float32), low.astype(np.float32)


# -- loading -----------------------------------------------------------------------------------

def sam2_installed() -> bool:
    return importlib.util.find_spec("sam2") is not None


def snapshot_format(folder: Path, kind: str) -> str:
    """Which loader reads `folder`: the entry's kind when its files are there (and, for
    sam2-pt, the sam2 package is installed), else the other format if present."""
    readable = {
        "sam2-hf": (folder / "config.json").is_file() and any(folder.glob("*.safetensors")),
        "sam2-pt": any(folder.glob("*.pt")) and sam2_installed(),
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
                             "`sam2` package (GPU image); or download the Hugging Face format "
                             "files (config.json, *.safetensors)")
    raise ModelLoadError(f"{folder} holds neither a Hugging Face format SAM2 (config.json, "
                         "*.safetensors) nor an official .pt checkpoint")


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> Segmenter:
    if entry.kind not in ("sam2-hf", "sam2-pt"):
        raise ModelLoadError(f"{entry.id}: unknown kind {entry.kind!r} for {NAME}")
    folder = files.folder(entry.main.repo, entry.main.revision)
    cache_size = int(entry.options.get("embedding_cache", DEFAULT_EMBEDDING_CACHE))
    if snapshot_format(folder, entry.kind) == "sam2-pt":
        return OfficialSam2(official_predictor(folder, entry, device), entry.id, device,
                            cache_size)
    return TransformersSam2(transformers_model(folder, entry, device), entry.id, device,
                            cache_size)


def transformers_model(folder: Path, entry: ModelEntry, device: Device) -> Any:
    from transformers import Sam2Config, Sam2Model
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    spec = json.loads((folder / "config.json").read_text())
    if spec.get("model_type") == "sam2_video":
        # facebook/sam2.1-* hold the video model; the image model is its subset (the memory
        # modules' weights are left unread). Building the config from its parts keeps
        # transformers from warning about the model type on every load.
        config = Sam2Config(**{key: spec[key] for key in
                               ("vision_config", "prompt_encoder_config", "mask_decoder_config")})
    elif spec.get("model_type") == "sam2":
        config = Sam2Config.from_dict(spec)
    else:
        raise ModelLoadError(f"{folder}/config.json is a {spec.get('model_type')!r} model, "
                             "not SAM2")
    model = Sam2Model.from_pretrained(folder, config=config, dtype=device.dtype(entry.dtype))
    if device.compile:  # TORCH_COMPILE: the image encoder is nearly all of a cold request
        model.vision_encoder.compile()
    return model.to(device.torch).eval()


def one_file(folder: Path, pattern: str, name: str | None) -> Path:
    paths = [folder / name] if name else sorted(folder.glob(pattern))
    if len(paths) != 1 or not paths[0].is_file():
        raise ModelLoadError(f"{folder}: expected one {name or pattern} file, found "
                             f"{[p.name for p in paths if p.is_file()]}; name it in the entry's "
                             "options (checkpoint, config)")
    return paths[0]


def official_model(config_yaml: str) -> Any:
    """A SAM2Base from an official hydra yaml, with what build_sam2 adds by default (fall back to
    the best of the multimask outputs when the single mask is unstable). OmegaConf and
    instantiate, not hydra's global compose, so a yaml outside the package's tree loads."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create(config_yaml)
    # hydra instantiates whatever `_target_` names: a yaml read from disk may name only the
    # sam2 package's own classes, as the official configs do.
    targets = [v for k, v in _walk(OmegaConf.to_container(config)) if k == "_target_"]
    if not targets or any(not str(t).startswith("sam2.") for t in targets):
        raise ModelLoadError("the SAM2 yaml may only instantiate classes of the sam2 package; "
                             f"it names {sorted(set(map(str, targets)))}")
    OmegaConf.update(config, "model.sam_mask_decoder_extra_args", {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }, force_add=True)
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


def _walk(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key, value) pair of a nested dict/list structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def official_predictor(folder: Path, entry: ModelEntry, device: Device) -> Any:
    """GPU image only. Weights stay float32 and run under bf16 autocast, the official recipe."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = official_model(one_file(folder, "*.yaml", entry.options.get("config")).read_text())
    checkpoint = one_file(folder, "*.pt", entry.options.get("checkpoint"))
    # weights_only: the official files hold only tensors in dicts; never unpickle code.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    model.to(device.torch).eval()
    if device.compile:  # TORCH_COMPILE, as for the transformers backend
        model.image_encoder.compile()
    predictor = SAM2ImagePredictor(model)
    side = model.image_size  # the predictor hard-codes the feature sizes of a 1024 input
    predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8),
                                (side // 16, side // 16)]
    return predictor


# -- one request -------------------------------------------------------------------------------

def run(model: Segmenter, request: SegmentAnything2Params, ctx) -> MasksResponse:
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


PAD = ord(" ")  # filler in the fixed-width number cells, dropped at the end


def json_array(values: np.ndarray, decimals: int = 0) -> str:
    """`values` (ndim >= 1, finite) as a JSON array string with `decimals` decimals per number
    ("-3.250"; integers when 0), vectorised: for a 3x1024x1024 mask about 0.04 s (0/1) and
    0.2 s (logits) where json.dumps(values.tolist()) takes 0.26 s and 1.1 s."""
    if values.ndim >= 3:  # one 2-D slab at a time keeps the scratch arrays small
        return "[" + ",".join(json_array(v, decimals) for v in values) + "]"
    if values.dtype.kind in "bui" and decimals == 0:
        scaled = values
    else:
        scaled = np.floor(np.asarray(values, dtype=np.float64) * 10**decimals + 0.5)
    top = int(np.abs(scaled).max()) if scaled.size else 0
    scaled = scaled.astype(np.int32 if top < 2**31 else np.int64)
    negative = scaled < 0
    signed = bool(negative.any())
    rest = np.abs(scaled) if signed else scaled
    # A fixed-width cell per number: [sign], digits with a point before the last `decimals`,
    # a comma; the padding is dropped once the whole text is laid out.
    digits = max(len(str(top)), decimals + 1)
    width = digits + (2 if decimals else 1) + signed
    cells = np.empty((*scaled.shape, width), dtype=np.uint8)
    if signed:
        cells[..., 0] = PAD + negative * (ord("-") - PAD)
    column = width - 2
    for i in range(digits):
        digit = (rest % 10).astype(np.uint8)
        if i > decimals:  # a leading zero of the integer part is padding
            cells[..., column] = PAD + (rest > 0) * (digit + (ord("0") - PAD))
        else:
            cells[..., column] = digit + ord("0")
        column -= 1
        if decimals and i == decimals - 1:
            cells[..., column] = ord(".")
            column -= 1
        rest //= 10
    cells[..., -1] = ord(",")
    rows = cells.reshape(-1, cells.shape[-2] * width)
    rows[:, -1] = ord("]")  # the last number's comma closes the row
    lines = [b"[" + row.tobytes() for row in rows]
    text = lines[0] if values.ndim == 1 else b"[" + b",".join(lines) + b"]"
    flat = np.frombuffer(text, dtype=np.uint8)
    return flat[flat != PAD].tobytes().decode("ascii")


# -- tiny checkpoints for CPU mode -------------------------------------------------------------
# The config measured in ../shared/notes/tiny-models-transformers.md ("d. SAM2 via
# transformers"): a 64x64 input, 16x16 low-res masks.

def tiny_parts() -> dict[str, Any]:
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(
        hidden_size=8, image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2],
        # Block 3 is stage 3's second block: a global block on a stage's first (q-pooling)
        # block fails with ZeroDivisionError (window 0).
        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    return {
        "vision_config": Sam2VisionConfig(
            backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32).to_dict(),
        "prompt_encoder_config": Sam2PromptEncoderConfig(
            hidden_size=32, image_size=64, patch_size=16, mask_input_channels=8).to_dict(),
        "mask_decoder_config": Sam2MaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
            iou_head_hidden_dim=32).to_dict(),
    }


def tiny_transformers_model() -> Any:
    """A random-weight SAM2 video model, the layout facebook/sam2.1-* ship (model_type
    sam2_video), so the tiny mode loads what the real snapshots hold."""
    import torch
    from transformers import Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(0)
    config = Sam2VideoConfig(
        **tiny_parts(), image_size=64, num_maskmem=2, memory_attention_hidden_size=32,
        memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[4, 4], memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16, memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
        # At the default 0.02 the random logits are ~1e-4, all 0.000 at 3 decimals; at 0.2 they
        # are ~0.1-0.4 and the three masks' scores differ, so the tests can tell them apart.
        initializer_range=0.2)
    return Sam2VideoModel(config).eval()


# Derived from the package's sam2.1_hiera_t.yaml (../shared/notes "d'."): 64x64 input.
TINY_OFFICIAL_YAML = """
model:
  _target_: sam2.modeling.sam2_base.SAM2Base
  image_encoder:
    _target_: sam2.modeling.backbones.image_encoder.ImageEncoder
    scalp: 1
    trunk:
      _target_: sam2.modeling.backbones.hieradet.Hiera
      embed_dim: 8
      num_heads: 1
      stages: [1, 1, 2, 1]
      global_att_blocks: [3]
      window_pos_embed_bkg_spatial_size: [4, 4]
      window_spec: [4, 4, 4, 2]
    neck:
      _target_: sam2.modeling.backbones.image_encoder.FpnNeck
      position_encoding:
        _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
        num_pos_feats: 32
        normalize: true
        scale: null
        temperature: 10000
      d_model: 32
      backbone_channel_list: [64, 32, 16, 8]
      fpn_top_down_levels: [2, 3]
      fpn_interp_model: nearest
  memory_attention:
    _target_: sam2.modeling.memory_attention.MemoryAttention
    d_model: 32
    pos_enc_at_input: true
    layer:
      _target_: sam2.modeling.memory_attention.MemoryAttentionLayer
      activation: relu
      dim_feedforward: 64
      dropout: 0.1
      pos_enc_at_attn: false
      self_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [4, 4]
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.1
      d_model: 32
      pos_enc_at_cross_attn_keys: true
      pos_enc_at_cross_attn_queries: false
      cross_attention:
        _target_: sam2.modeling.sam.transformer.RoPEAttention
        rope_theta: 10000.0
        feat_sizes: [4, 4]
        rope_k_repeat: true
        embedding_dim: 32
        num_heads: 1
        downsample_rate: 1
        dropout: 0.1
        kv_in_dim: 16
    num_layers: 1
  memory_encoder:
    _target_: sam2.modeling.memory_encoder.MemoryEncoder
    out_dim: 16
    in_dim: 32
    position_encoding:
      _target_: sam2.modeling.position_encoding.PositionEmbeddingSine
      num_pos_feats: 16
      normalize: true
      scale: null
      temperature: 10000
    mask_downsampler:
      _target_: sam2.modeling.memory_encoder.MaskDownSampler
      kernel_size: 3
      stride: 2
      padding: 1
      embed_dim: 32
      total_stride: 16
    fuser:
      _target_: sam2.modeling.memory_encoder.Fuser
      layer:
        _target_: sam2.modeling.memory_encoder.CXBlock
        dim: 32
        kernel_size: 7
        padding: 3
        layer_scale_init_value: 1e-6
        use_dwconv: true
      num_layers: 1
  num_maskmem: 2
  image_size: 64
  sigmoid_scale_for_mem_enc: 20.0
  sigmoid_bias_for_mem_enc: -10.0
  use_mask_input_as_output_without_sam: true
  directly_add_no_mem_embed: true
  no_obj_embed_spatial: true
  use_high_res_features_in_sam: true
  multimask_output_in_sam: true
  iou_prediction_use_sigmoid: true
  use_obj_ptrs_in_encoder: true
  add_tpos_enc_to_obj_ptrs: true
  proj_tpos_enc_in_obj_ptrs: true
  use_signed_tpos_enc_to_obj_ptrs: true
  only_obj_ptrs_in_the_past_for_eval: true
  pred_obj_scores: true
  pred_obj_scores_mlp: true
  fixed_no_obj_ptr: true
  multimask_output_for_tracking: true
  use_multimask_token_for_obj_ptr: true
  multimask_min_pt_num: 0
  multimask_max_pt_num: 1
  use_mlp_for_obj_ptr_proj: true
  compile_image_encoder: false
"""


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    """sam2-hf: a Hugging Face format snapshot. sam2-pt: the official layout (yaml + .pt with
    {"model": state_dict}), which needs the sam2 package to build, so only in the GPU image."""
    if entry.kind == "sam2-pt":
        if not sam2_installed():
            raise ModelLoadError(f"{entry.id} (kind sam2-pt): a tiny official checkpoint needs "
                                 "the `sam2` package, which is only in the GPU image")
        import torch

        torch.manual_seed(0)
        state = official_model(TINY_OFFICIAL_YAML).state_dict()
        with writing_snapshot(model_dir, entry.main.repo) as folder:
            (folder / "sam2_tiny_random.yaml").write_text(TINY_OFFICIAL_YAML)
            torch.save({"model": state}, folder / "sam2_tiny_random.pt")
        return
    model = tiny_transformers_model()
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)


def move(model: Segmenter, target: Any) -> None:
    """The cache's demotion to CPU RAM and promotion back: the network moves, and the image
    embeddings on the device are dropped, so a demotion frees all of the model's memory."""
    model.forget_images()
    move_model(model, target)


def warm_up(model: Segmenter, entry: ModelEntry) -> None:
    """TORCH_COMPILE: one embedding at load (every input is resized to the model's square
    size, so one shape covers all requests)."""
    model.embed(np.zeros((64, 64, 3), dtype=np.uint8))


def working_memory(entry: ModelEntry, request: Any, float_bytes: int) -> int:
    """The image encoder at SAM2's fixed 1024x1024 input dominates."""
    return wm.fixed(1024, float_bytes)
