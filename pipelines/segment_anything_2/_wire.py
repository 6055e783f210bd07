"""The request and response models of /segment-anything-2, as go-livepeer sends and reads
them: prompts and masks are JSON array strings."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pipelines._fields import ModelId
from runner.protocol import Upload


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
