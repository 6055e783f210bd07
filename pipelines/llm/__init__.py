"""Generate text using a language model.

Chat completions on the contract's `POST /llm` (and, through runner/openai.py, on the OpenAI
routes), from one of two backends behind the same interface:

- **ollama** (the product default, used by the llm image): a local Ollama daemon at
  `OLLAMA_HOST`, through the official `ollama` client. models.yaml maps each model id to an
  Ollama tag (`options.ollama_tag`); a request may also name a tag directly (`"llama3.1:8b"`:
  anything with a `:`, which no hub id has), served by the pipeline's default entry. A model the
  daemon lacks is pulled when `OLLAMA_PULL=1`, else refused with 422; a daemon that cannot be
  reached is a 503.
- **transformers** (CPU tiny mode, and a GPU fallback without Ollama): a causal LM with its chat
  template, generating in a thread of its own and streaming through a token streamer, one
  generation at a time per model.

`LLM_BACKEND=ollama|transformers` picks one; unset, an entry whose Hugging Face snapshot is in
MODEL_DIR (always, in tiny mode) runs on transformers, any other on Ollama.

`run` and `stream` are coroutines: they wait on a daemon or on a generation thread, never
compute on the event loop. A consumer that stops reading a stream (the client went away) closes
the generator, which closes the upstream Ollama request or stops the generation thread.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from pipelines import _working_memory as wm

# The names below are the package's face: the runner reads the pipeline interface from here,
# and tests and scripts reach the backends' parts as `llm.X`, as when this was one module.
from pipelines.llm._backend import Backend
from pipelines.llm._entry_options import Options
from pipelines.llm._hf_backend import (
    DEFAULT_MAX_TOKENS,
    MIN_SAMPLING_TEMPERATURE,
    STREAM_DRAIN_S,
    StopScanner,
    TransformersBackend,
    kv_bytes_per_token,
    transformers_backend,
)
from pipelines.llm._ollama_backend import (
    CONNECT_TIMEOUT_S,
    DAEMON_WAIT_S,
    DEFAULT_OLLAMA_HOST,
    OllamaBackend,
    ollama_client,
    ollama_host,
    same_tag,
)
from pipelines.llm._tiny import (
    TINY_CHAT_TEMPLATE,
    TINY_CORPUS,
    TINY_SPECIALS,
    build_tiny,
    tiny_chat_model,
)
from pipelines.llm._wire import (
    LLMRequest,
    Piece,
    closing,
    completion_id,
    finish_reason,
    is_ollama_tag,
)
from runner import checkpoints
from runner.context import RunContext
from runner.device import Device
from runner.errors import FieldError, ModelLoadError, Unavailable
from runner.hub import ModelFiles
from runner.protocol import LLMResponse
from runner.registry import ModelEntry
from runner.sample import Sample, Scale

__all__ = [
    # the pipeline interface
    "CLIENT_OPTIONS", "ERROR_STATUSES", "HEALTH_TIMEOUT_S", "NAME", "OPENAI_CHAT", "OPERATION_ID",
    "REQUIRES", "SUMMARY", "Options", "Request", "Response", "backend_name", "build_tiny",
    "estimate", "file_problems", "health", "load", "run", "stream", "tag_needs_ollama",
    # the parts, as when this was one module
    "CONNECT_TIMEOUT_S", "DAEMON_WAIT_S", "DEFAULT_OLLAMA_HOST", "MIN_SAMPLING_TEMPERATURE",
    "STREAM_DRAIN_S", "TINY_CHAT_TEMPLATE", "TINY_CORPUS", "TINY_SPECIALS", "Backend",
    "LLMRequest", "OllamaBackend", "Piece", "StopScanner", "TransformersBackend",
    "closing", "completion_id", "finish_reason", "is_ollama_tag", "ollama_client",
    "ollama_host", "same_tag", "tiny_chat_model", "transformers_backend",
]

NAME = "llm"
OPERATION_ID = "genLLM"
SUMMARY = "LLM"
OPENAI_CHAT = True  # runner/openai.py serves this module as /v1/chat/completions
REQUIRES = ("ollama", "transformers>=4.56")
# go-livepeer's worker reads only these on /llm: a 422 it decodes but answers its client as
# "200 null" (ai/worker/worker.go), so a schema error here is a 400 naming the field.
ERROR_STATUSES = (400, 401, 500)

HEALTH_TIMEOUT_S = 2.0

# Extra keyword arguments for the Ollama clients (httpx.Client / AsyncClient options). Tests put
# a `transport` here to reach an in-process double; nothing else needs to touch it. `load` reads
# it when it builds a backend, so replacing it here reaches the clients made after.
CLIENT_OPTIONS: dict[str, Any] = {}

Request = LLMRequest
Response = LLMResponse


# -- the module interface --------------------------------------------------------------------

def backend_name(entry: ModelEntry, files: ModelFiles) -> str:
    name = os.environ.get("LLM_BACKEND", "").strip().lower()
    if name in ("ollama", "transformers"):
        return name
    if name:
        raise ModelLoadError(f"LLM_BACKEND={name!r}: use 'ollama' or 'transformers'")
    return "transformers" if files.has(entry.main.repo, entry.main.revision) else "ollama"


def estimate(entry: ModelEntry, files: ModelFiles, float_bytes: int) -> int | None:
    """Bytes this process will hold for the model: None (the weights on disk tell) for the
    transformers backend; 0 for Ollama, whose daemon holds the model in its own memory (the
    cache sees it through `size_vram`) and has no weights in MODEL_DIR."""
    return None if backend_name(entry, files) == "transformers" else 0


def file_problems(entry: ModelEntry, files: ModelFiles) -> list[str] | None:
    """What the model's files lack, before the runner starts: None for the transformers
    backend (its snapshot is checked like any other); for Ollama, the daemon's manifest and
    blobs where it keeps them here (OLLAMA_MODELS, as in the llm image), else nothing to
    check (a daemon elsewhere answers for its models when the runner loads)."""
    if backend_name(entry, files) == "transformers":
        return None
    tag, store = Options.of(entry).ollama_tag, os.environ.get("OLLAMA_MODELS")
    if not tag:
        return [f"models.yaml gives {entry.id} no options.ollama_tag for the Ollama backend"]
    return checkpoints.ollama_problems(tag, Path(store)) if store else []


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> Backend:
    if backend_name(entry, files) == "transformers":
        return transformers_backend(entry, files, device)
    backend = OllamaBackend(entry, CLIENT_OPTIONS)
    backend.prepare()
    return backend


async def run(model: Backend, request: LLMRequest, ctx: RunContext) -> LLMResponse:
    # 1. The backend generates (an Ollama call, or a generation thread); 2. one response
    #    with the whole answer, its finish_reason and the backend's token counts.
    if is_ollama_tag(request.model) and not isinstance(model, OllamaBackend):
        raise tag_needs_ollama(request.model, model)
    return await model.run(request, ctx)


async def stream(model: Backend, request: LLMRequest, ctx: RunContext
                 ) -> AsyncIterator[LLMResponse]:
    # 1. The backend streams text pieces; 2. each becomes a chunk with the usage so far, the
    #    last with the finish_reason. Closing this generator stops the generation.
    if is_ollama_tag(request.model) and not isinstance(model, OllamaBackend):
        raise tag_needs_ollama(request.model, model)
    async with closing(model.stream(request, ctx)) as chunks:
        async for chunk in chunks:
            yield chunk


async def health(model: Backend) -> bool:
    """Whether the loaded model can serve now, answered within HEALTH_TIMEOUT_S (for /health,
    which go-livepeer polls with a 5 s timeout): an Ollama daemon that went away makes it False."""
    with anyio.move_on_after(HEALTH_TIMEOUT_S):
        try:
            await model.ping()
        except Unavailable:
            return False
        return True
    return False


def tag_needs_ollama(tag: str, model: Backend) -> FieldError:
    return FieldError("model", f"{tag!r} is an Ollama tag, but this runner serves "
                      f"{model.entry.id} with {model.kind}; send a model id from models.yaml "
                      "or run with LLM_BACKEND=ollama")


def working_memory(entry: ModelEntry, files: ModelFiles, request: LLMRequest,
                   float_bytes: int) -> int:
    """The in-process backend's KV cache for this request: its bytes per token (from the
    model's config) times the prompt (about three characters a token, counted high) and the
    answer's most tokens. 0 for Ollama, whose daemon holds its own memory."""
    if backend_name(entry, files) != "transformers":
        return 0
    per_token = kv_bytes_per_token(wm.model_config(files, entry.main.repo, entry.main.revision),
                                   float_bytes)
    prompt = sum(len(m.content) for m in request.messages) // 3 + 8 * len(request.messages)
    return per_token * (prompt + (request.max_tokens or DEFAULT_MAX_TOKENS))


def sample_request(scale: Scale) -> Sample:
    """A short story, greedy and seeded, so runs (and the naive call) agree token for token."""
    return Sample({"messages": [{"role": "user",
                                 "content": "Tell me a story about a cat and a dog."}],
                   "model": scale.model, "max_tokens": scale.max_tokens, "seed": 1,
                   "temperature": 0})
