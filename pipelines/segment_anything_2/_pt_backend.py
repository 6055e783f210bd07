"""The `sam2-pt` loader: the `sam2` package's SAM2ImagePredictor on an official `.pt` checkpoint
and its hydra yaml. The package imports torchvision, so of the images only segment-anything-2's
serves it; the CPU tests run it with a stand-in for torchvision's transforms."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.segment_anything_2._entry_options import Options
from pipelines.segment_anything_2._prompts import Prompts
from pipelines.segment_anything_2._segmenter import Segmenter
from runner.device import Device
from runner.errors import ModelLoadError
from runner.registry import ModelEntry


class OfficialSam2(Segmenter):
    """The `sam2` package's SAM2ImagePredictor (the segment-anything-2 image: the package needs
    torchvision)."""

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


def sam2_available() -> bool:
    """The sam2 package and the torchvision its image predictor imports are both installed
    (the CPU environment has the package without torchvision)."""
    return all(importlib.util.find_spec(name) is not None for name in ("sam2", "torchvision"))


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
    """Weights stay float32 and run under bf16 autocast on CUDA, the official recipe."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    options = Options.of(entry)
    model = official_model(one_file(folder, "*.yaml", options.config).read_text())
    checkpoint = one_file(folder, "*.pt", options.checkpoint)
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
