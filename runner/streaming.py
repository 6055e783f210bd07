"""Server-sent events for streamed answers, shared by the contract routes and the OpenAI
layer: the session opens before the first byte (so early errors keep their status), chunks
follow as `data:` lines, and a failure after the first chunk ends the stream in-band."""

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from runner.errors import RunnerError, is_failure
from runner.executor import as_runner_error
from runner.protocol import StreamChunk
from runner.service import Service
from runner.spec import PipelineSpec

log = logging.getLogger(__name__)


def failure_chunk(last: StreamChunk, exc: RunnerError) -> str:
    """The contract's way to end a failed stream: go-livepeer reads Choices[0] of every chunk
    (a chunk without one panics it), so no bare error object, but a last chunk with
    finish_reason "error"; the reason is in the runner's log."""
    return last.failure().model_dump_json(exclude_none=True)


async def stream_events(service: Service, spec: PipelineSpec, request: BaseModel,
                        adapt: Callable[[AsyncIterator[Any]], AsyncIterator[BaseModel]]
                        | None = None,
                        failed: Callable[[Any, RunnerError], str] = failure_chunk,
                        ping: float = 0) -> EventSourceResponse:
    """Server-sent events: `data: <chunk json>` per chunk, then `data: [DONE]`. The session is
    opened first, so unknown models, full queues and the like keep their status codes; an
    error after the first chunk is sent as the event `failed` makes of the last chunk. A
    client that goes away cancels the generator, which stops the backend and frees the lane.
    `adapt` rewrites the module's chunks into another wire format (the OpenAI layer's). No
    `: ping` comments unless asked for (`ping` seconds): go-livepeer logs every line that is
    not `data: ...` as a decode error."""
    stack = AsyncExitStack()
    session = await stack.enter_async_context(service.session(spec, request))
    chunks = service.stream(spec, session)
    chunks = adapt(chunks) if adapt else chunks
    try:  # a stream that fails before its first chunk still gets its own status code
        first = await anext(chunks, None)
    except Exception as exc:
        await stack.aclose()
        error = as_runner_error(exc)
        if error is exc:
            raise
        raise error from exc
    except BaseException:
        await stack.aclose()
        raise

    async def events():
        last = first
        try:
            if first is not None:
                yield {"data": first.model_dump_json(exclude_none=True)}
                async for last in chunks:
                    yield {"data": last.model_dump_json(exclude_none=True)}
        except Exception as exc:  # the stream has started: end it in-band, log why
            error = as_runner_error(exc)
            # ERROR only for what an operator must act on; busy or a client's mistake is INFO
            level = logging.ERROR if is_failure(error) else logging.INFO
            log.log(level, "stream of %s failed after it started: %s", spec.name, error.msg,
                    exc_info=exc if error is not exc else None)
            yield {"data": failed(last, error)}
        finally:
            await stack.aclose()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), sep="\n", ping=ping)
