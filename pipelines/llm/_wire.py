"""What goes between a client, the runner and a backend: the request, the pieces of text a
backend generates, and the helpers that turn them into the contract's responses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from runner import protocol
from runner.protocol import LLMTokenUsage

# -- request and response --------------------------------------------------------------------

# The contract's request, whose `model` may also be an Ollama tag. (No docstring: it would
# become a description in openapi.yaml, which the reference contract's LLMRequest lacks.)
class LLMRequest(protocol.LLMRequest):

    @property
    def model_id(self) -> str:
        """The models.yaml id the runner resolves: an Ollama tag goes to the default entry,
        whose Ollama backend serves it."""
        return "" if is_ollama_tag(self.model) else self.model


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
