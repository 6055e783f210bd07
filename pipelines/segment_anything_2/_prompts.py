"""A request's prompts: the JSON array strings parsed and checked against the image and the
model's mask size (each mistake a 400 naming the field), coordinates made fractions of the
image."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipelines.segment_anything_2._wire import SegmentAnything2Params
from runner.errors import BadRequest

MAX_POINTS = 64  # point prompts per request; real clicks number a handful


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
