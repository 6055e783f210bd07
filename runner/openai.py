"""The OpenAI chat API (`POST /v1/chat/completions`, `GET /v1/models`) over a chat pipeline
(one that sets OPENAI_CHAT and speaks the contract's LLMRequest/LLMResponse of
runner/protocol.py), so the official `openai` client works unchanged.

Protocol (the OpenAI wire types), serving (conversion to and from the module's own request
and chunks) and router are kept apart, as in vLLM; generation itself is the module's, reached
through the same service, lanes, cache and errors as its contract route.
"""

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

from runner.errors import ERROR_RESPONSES, RunnerError
from runner.protocol import LLMRequest, LLMResponse
from runner.service import Service
from runner.spec import PipelineSpec
from runner.streaming import stream_events

# Keep-alive comments on OpenAI streams, for proxies that close quiet connections; the
# contract's /llm sends none (go-livepeer logs them as decode errors).
PING_SECONDS = 15

# -- protocol ------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """What the `openai` client sends; fields this runner does not use are accepted and
    ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    messages: list[ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "runner"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- serving -------------------------------------------------------------------------------


def to_llm_request(spec: PipelineSpec, request: ChatCompletionRequest) -> LLMRequest:
    """The chat pipeline's own request; its validation errors are this route's 422s."""
    fields = {
        "messages": [{"role": m.role, "content": m.text()} for m in request.messages],
        "model": request.model, "temperature": request.temperature, "top_p": request.top_p,
        "max_tokens": request.max_completion_tokens or request.max_tokens,
        "stop": request.stop, "seed": request.seed, "stream": request.stream,
    }
    accepted = spec.request.model_fields
    try:
        inner = spec.request.model_validate(
            {k: v for k, v in fields.items() if v is not None and k in accepted})
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from exc
    assert isinstance(inner, LLMRequest)  # router() serves only pipelines whose request is one
    return inner


def completion(response: LLMResponse, model: str) -> ChatCompletion:
    choice = response.choices[0]
    content = choice.message.content if choice.message else ""
    return ChatCompletion(
        id=response.id, created=response.created, model=model,
        choices=[Choice(message=AssistantMessage(content=content),
                        finish_reason=choice.finish_reason or "stop")],
        usage=Usage(**response.usage.model_dump()))


def stream_error(_: ChatCompletionChunk, exc: RunnerError) -> str:
    """How an OpenAI stream reports a failure after its first chunk: an `error` object, which
    the `openai` client raises as an APIError."""
    return json.dumps({"error": {"message": exc.msg, "code": exc.status_code}})


def chunk_adapter(model: str, include_usage: bool
                  ) -> Callable[[AsyncIterator[LLMResponse]], AsyncIterator[ChatCompletionChunk]]:
    """The module's chunks as OpenAI chunks: the role on the first, the finish reason on the
    last, and usage in a final choice-less chunk when the client asked for it."""

    async def adapt(chunks: AsyncIterator[LLMResponse]) -> AsyncIterator[ChatCompletionChunk]:
        first, last = True, None
        async for chunk in chunks:
            last = chunk
            choice = chunk.choices[0]
            content = choice.delta.content if choice.delta else ""
            delta = Delta(role="assistant" if first else None, content=content)
            yield ChatCompletionChunk(
                id=chunk.id, created=chunk.created, model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=choice.finish_reason or None)])
            first = False
        if include_usage and last is not None:
            yield ChatCompletionChunk(id=last.id, created=last.created, model=model, choices=[],
                                      usage=Usage(**last.usage.model_dump()))

    return adapt


# -- router --------------------------------------------------------------------------------


def router(service: Service, spec: PipelineSpec, auth: Callable) -> APIRouter:
    if not (issubclass(spec.request, LLMRequest) and issubclass(spec.response, LLMResponse)):
        raise TypeError(f"{spec.name} sets OPENAI_CHAT but does not speak runner.protocol's "
                        "LLMRequest and LLMResponse")
    api = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(auth)])

    @api.post("/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
              operation_id="createChatCompletion", summary="Chat completion (OpenAI API)")
    async def chat_completions(request: ChatCompletionRequest):
        inner = to_llm_request(spec, request)
        model = request.model or service.registry.default(spec.name).id
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return await stream_events(service, spec, inner,
                                       adapt=chunk_adapter(model, include_usage),
                                       failed=stream_error, ping=PING_SECONDS)
        answer = await service.generate(spec, inner)
        assert isinstance(answer, LLMResponse)
        return completion(answer, model)

    @api.get("/models", response_model=ModelList, operation_id="listModels",
             summary="Models (OpenAI API)")
    async def models() -> ModelList:
        created = int(time.time())
        return ModelList(data=[ModelCard(id=entry.id, created=created)
                               for entry in service.registry.entries(spec.name)])

    return api
