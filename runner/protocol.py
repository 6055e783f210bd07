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


class Readiness(BaseModel):
    """GET /ready: 200 while serving, 503 while loading, failing or draining (SIGTERM), for
    health checks that read only the status code (go-livepeer's static Live Runners)."""

    ready: bool
    status: Literal["LOADING", "OK", "ERROR", "IDLE", "DRAINING"]


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


# The contract's /llm request. A pipeline may subclass it to say how `model` names a
# models.yaml entry (`model_id`). No docstring: it would show in the schema.
class LLMRequest(BaseModel):

    messages: list[LLMMessage] = Field(
        min_length=1, description="The conversation so far, oldest first.")
    model: str = Field("", description="Model id from models.yaml, or an Ollama tag "
                       "('llama3.1:8b'); '' = the runner's default model.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature, 0 = greedy; default: the model's.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; default: the model's.")
    top_p: float | None = Field(
        None, ge=0, le=1, description="Nucleus sampling mass; default: the model's.")
    top_k: int | None = Field(
        None, ge=-1, description="Sample among the k likeliest tokens; -1 = no limit.")
    stream: bool = Field(False, description="Send server-sent events, one per text delta.")
    stop: str | list[str] | None = Field(
        None, description="Text (or up to 16 texts) that ends the answer; not included in it.")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed for sampling, for repeatable answers.")

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("top_k must be -1 (no limit) or at least 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        texts = [value] if isinstance(value, str) else value or []
        if len(texts) > 16 or any(not text for text in texts):
            raise ValueError("stop takes at most 16 non-empty texts")
        return value

    @property
    def model_id(self) -> str:
        """The models.yaml id the request names ("" = the default model)."""
        return self.model

    def stop_texts(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
