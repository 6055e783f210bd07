"""Wire types of the reference contract shared by several routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, Self

from fastapi import UploadFile
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
)

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


class StreamChunk(Protocol):
    """A streamed answer's chunk: it knows how to end a stream whose generation failed."""

    def failure(self) -> Self: ...

    def model_dump_json(self, *, exclude_none: bool = ...) -> str: ...


# -- llm ---------------------------------------------------------------------------------------

class LLMMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(
        description="Who wrote the message: system, user or assistant.")
    content: str = Field(description="The message text.")

    @field_validator("content")
    @classmethod
    def _text(cls, value: str) -> str:
        try:  # JSON can carry lone surrogates ("\ud800"), which no tokenizer takes
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("content must be Unicode text (it holds a lone surrogate)") from None
        return value


class LLMTokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LLMChoice(BaseModel):
    index: int
    finish_reason: str = ""
    delta: LLMMessage | None = None
    message: LLMMessage | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> Any:
        # The contract's delta/message are objects, never null: leave the unused one out.
        return {k: v for k, v in handler(self).items() if v is not None}


class LLMResponse(BaseModel):
    id: str
    model: str
    created: int
    usage: LLMTokenUsage
    choices: list[LLMChoice]

    def failure(self) -> LLMResponse:
        """The last chunk of a stream whose generation failed after it started: same id and
        usage so far, one choice with an empty delta and finish_reason "error"."""
        empty = LLMMessage(role="assistant", content="")
        return self.model_copy(update={"choices": [
            LLMChoice(index=0, finish_reason="error", delta=empty)]})
