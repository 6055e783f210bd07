"""Wire types of the reference contract shared by several routes."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, Field, WithJsonSchema

# An uploaded file field; a Request with one is served as multipart/form-data. Its schema is
# written as the reference contract writes it.
Upload = Annotated[UploadFile, WithJsonSchema({"type": "string", "format": "binary"})]


class APIError(BaseModel):
    msg: str = Field(description="The error message.")


class HTTPError(BaseModel):
    detail: APIError = Field(description="Detailed error information.")


class Media(BaseModel):
    url: str = Field(description="The URL where the media can be accessed.")
    seed: int = Field(description="The seed used to generate the media.")
    nsfw: bool = Field(description="Whether the media was flagged as NSFW.")


class ImageResponse(BaseModel):
    images: list[Media] = Field(description="The generated images.")


class HealthCheck(BaseModel):
    status: Literal["LOADING", "OK", "ERROR", "IDLE"] = Field(
        description="The health status of the pipeline"
    )


class Version(BaseModel):
    pipeline: str
    model_id: str
    version: str = Field(description="The version of the Runner")
    mode: Literal["gpu", "cpu", "tiny"] = Field(
        description="tiny: every model is a random-weight test checkpoint; outputs are noise."
    )


class GPUComputeInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    major: int
    minor: int


class GPUUtilizationInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    utilization_compute: int
    utilization_memory: int


class HardwareInformation(BaseModel):
    pipeline: str
    model_id: str
    gpu_info: dict[str, GPUComputeInfo]


class HardwareStats(BaseModel):
    pipeline: str
    model_id: str
    gpu_stats: dict[str, GPUUtilizationInfo]
