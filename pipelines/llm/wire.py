"""What goes between a client, the runner and a backend: the request, the pieces of text a
backend generates, and the helpers that turn them into the contract's responses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel, Field, field_validator

from runner.protocol import LLMMessage, LLMTokenUsage

# -- request and response --------------------------------------------------------------------

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
        """The models.yaml id the runner resolves: an Ollama tag goes to the default entry,
        whose Ollama backend serves it."""
        return "" if is_ollama_tag(self.model) else self.model

    def stop_texts(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def is_ollama_tag(name: str) -> bool:
    """`llama3.1:8b`, `qwen2.5:7b-instruct-q4_K_M`: a colon, which no hub id has."""
    return ":" in name


@dataclass
class Piece:
    """A stretch of generated text and the token counts so far; the last piece of a
    generation has a finish_reason ("stop" or "length")."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = ""

    def usage(self) -> LLMTokenUsage:
        return LLMTokenUsage(prompt_tokens=self.prompt_tokens,
                             completion_tokens=self.completion_tokens,
                             total_tokens=self.prompt_tokens + self.completion_tokens)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


@asynccontextmanager
async def closing(agen: Any) -> AsyncIterator[Any]:
    """Like contextlib.aclosing, but the close runs even in a cancelled task, so a client
    that goes away still closes the upstream request or stops the generation thread."""
    try:
        yield agen
    finally:
        with anyio.CancelScope(shield=True):
            await agen.aclose()


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
