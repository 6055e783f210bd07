"""What every backend does: a loaded chat model generates pieces of text; `run` and `stream`
shape them into the contract's responses."""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator

from pipelines.llm._wire import LLMRequest, Piece, closing, completion_id
from runner.context import RunContext
from runner.errors import InferenceError
from runner.protocol import LLMChoice, LLMMessage, LLMResponse
from runner.registry import ModelEntry


class Backend(abc.ABC):
    """A loaded chat model. Subclasses implement `generate`; `run` and `stream` shape its
    pieces into the contract's responses."""

    kind = ""

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    @abc.abstractmethod
    def generate(self, request: LLMRequest, stream: bool) -> AsyncIterator[Piece]:
        """The answer as pieces of text, the last one with its finish_reason and usage."""

    async def run(self, request: LLMRequest, ctx: RunContext) -> LLMResponse:
        texts: list[str] = []
        last: Piece | None = None
        with ctx.stage("generate"):
            async with closing(self.generate(request, stream=False)) as pieces:
                async for piece in pieces:
                    texts.append(piece.text)
                    last = piece
        if last is None or not last.finish_reason:
            raise InferenceError(f"{self.kind} ended the answer without its final chunk")
        return LLMResponse(
            id=completion_id(), model=request.model or self.entry.id, created=int(time.time()),
            usage=last.usage(),
            choices=[LLMChoice(index=0, finish_reason=last.finish_reason,
                               message=LLMMessage(role="assistant", content="".join(texts)))],
        )

    async def stream(self, request: LLMRequest, ctx: RunContext
                     ) -> AsyncIterator[LLMResponse]:
        """One chunk per text delta with the usage so far; the last has the finish_reason."""
        rid, created, name = completion_id(), int(time.time()), request.model or self.entry.id
        async with closing(self.generate(request, stream=True)) as pieces:
            async for piece in pieces:
                if not piece.text and not piece.finish_reason:
                    continue
                yield LLMResponse(
                    id=rid, model=name, created=created, usage=piece.usage(),
                    choices=[LLMChoice(index=0, finish_reason=piece.finish_reason,
                                       delta=LLMMessage(role="assistant", content=piece.text))],
                )
                if piece.finish_reason:
                    return
        raise InferenceError(f"{self.kind} ended the stream without its final chunk")

    async def ping(self) -> None:
        """Raises Unavailable when the backend cannot serve (a daemon that went away); an
        in-process model is always there."""
        return None

    def size_vram(self) -> int:
        """Device bytes held outside this process for this model (an Ollama daemon's)."""
        return 0

    def unload(self) -> None:
        """Give the model's memory back (the cache is evicting it); an in-process model's
        memory goes with the object."""
        return None
