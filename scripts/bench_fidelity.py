"""How far the runner's answer lands from the naive library path's on the same weights, seed
and settings, for scripts/bench.py --naive: a fast path (half precision, fused attention,
compiled kernels) that changes the output is not faster.

- images and video frames: PSNR in dB of the runner's PNG against the naive one (identical
  images: inf). Bound: 30 dB. Half precision against float32 on a real SDXL lands around
  35-40 dB; below 30 dB differences start to be visible side by side.
- text (transcripts, captions, LLM answers): the share of words that agree, in order
  (difflib's matching blocks over the longer answer). Bound: 0.9. Identical on the CPU,
  where both run float32; random-weight decoders on a GPU choose among near-equal logits, so
  there one flipped token changes the rest and the share is an indication only.
- masks (SAM2): the IoU of the best-scored mask of each. Bound: 0.9.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import math
from typing import Any

BOUNDS = {"psnr_db": 30.0, "word_agreement": 0.9, "mask_iou": 0.9}


def runner_output(pipeline: str, body: dict) -> Any:
    """What to compare of the runner's answer: images as uint8 arrays, text as a string,
    the best mask as a boolean array."""
    if pipeline in ("text-to-image", "image-to-image", "upscale"):
        return [_png(media["url"]) for media in body["images"]]
    if pipeline == "image-to-video":
        return [_png(media["url"]) for media in body["frames"][0]]
    if pipeline in ("audio-to-text", "image-to-text"):
        return body["text"]
    if pipeline == "llm":
        return body["choices"][0]["message"]["content"]
    if pipeline == "segment-anything-2":
        import numpy as np

        masks = np.asarray(json.loads(body["masks"]))
        return masks[0] > 0  # sorted by score: the best first
    return None


def naive_output(pipeline: str, value: Any) -> Any:
    """The same of the naive path's return value (PNG bytes, JSON text, decoded text)."""
    if value is None:
        return None
    if pipeline in ("text-to-image", "image-to-image", "upscale", "image-to-video"):
        return [_png_bytes(png) for png in value]
    if pipeline == "audio-to-text":
        return json.loads(value)["text"]
    if pipeline in ("image-to-text", "llm"):
        return value
    if pipeline == "segment-anything-2":
        import numpy as np

        answer = json.loads(value)
        masks, scores = np.asarray(answer["masks"]), answer["scores"]
        return masks[int(np.argmax(scores))] > 0
    return None


def compare(pipeline: str, ours: Any, theirs: Any) -> dict | None:
    if ours is None or theirs is None:
        return None
    if isinstance(ours, list):
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs,
                                                                              strict=True)):
            return {"metric": "psnr_db", "value": None, "note": "the sizes differ"}
        value = min(psnr(a, b) for a, b in zip(ours, theirs, strict=True))
        return _bounded("psnr_db", value)
    if isinstance(ours, str):
        return _bounded("word_agreement", word_agreement(ours, theirs))
    if ours.shape != theirs.shape:
        return {"metric": "mask_iou", "value": None, "note": "the sizes differ"}
    union = (ours | theirs).sum()
    return _bounded("mask_iou", float((ours & theirs).sum() / union) if union else 1.0)


def _bounded(metric: str, value: float) -> dict:
    return {"metric": metric, "value": value, "bound": BOUNDS[metric],
            "within": value >= BOUNDS[metric]}


def psnr(a: Any, b: Any) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def word_agreement(a: str, b: str) -> float:
    words_a, words_b = a.split(), b.split()
    if not words_a and not words_b:
        return 1.0
    matcher = difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False)
    same = sum(block.size for block in matcher.get_matching_blocks())
    return same / max(len(words_a), len(words_b))


def _png(url: str) -> Any:
    return _png_bytes(base64.b64decode(url.split(",", 1)[1]))


def _png_bytes(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def describe(result: dict | None) -> str:
    if not result:
        return "–"
    value = result["value"]
    if value is None:
        return result.get("note", "–")
    shown = "identical" if value == math.inf else (
        f"{value:.1f} dB" if result["metric"] == "psnr_db" else f"{value:.2f}")
    return f"{shown} ({'within' if result['within'] else 'OUTSIDE'} {result['bound']:g})"
