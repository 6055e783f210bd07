"""The `sam2-hf` loader: transformers' Sam2Model on a Hugging Face format snapshot (config.json +
safetensors; `sam2` and `sam2_video` configs both load). No torchvision: the resize, the
ImageNet normalisation and the mask upsampling are done here, as the official predictor does
them. This is the CPU tiny mode's loader too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.segment_anything_2._prompts import Prompts
from pipelines.segment_anything_2._segmenter import Segmenter
from runner.device import Device
from runner.errors import ModelLoadError
from runner.registry import ModelEntry

LOGIT_CLAMP = 32.0  # the official predictor clamps the low-res logits to +-32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
