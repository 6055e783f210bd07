"""The Ollama backend: a local Ollama daemon at OLLAMA_HOST, through the official `ollama`
client. models.yaml maps each model id to an Ollama tag (`options.ollama_tag`); a request may
also name a tag directly. A model the daemon lacks is pulled when OLLAMA_PULL=1, else refused;
a daemon that cannot be reached is a 503."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from pipelines.llm._backend import Backend
from pipelines.llm._entry_options import Options
from pipelines.llm._wire import LLMRequest, Piece, closing, finish_reason, is_ollama_tag
from runner.errors import (
    BadRequest,
    FieldError,
    InferenceError,
    ModelLoadError,
    RunnerError,
    Unavailable,
)
from runner.registry import ModelEntry

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
DAEMON_WAIT_S = 30.0  # how long the first load waits for a daemon that is still starting
CONNECT_TIMEOUT_S = 10.0


def ollama_host() -> str:
    return os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def ollama_client(asynchronous: bool = True, client_options: dict[str, Any] | None = None
                  ) -> Any:
    """An Ollama client for OLLAMA_HOST; `client_options` (the package's CLIENT_OPTIONS) go to
    its httpx client."""
    import httpx
    import ollama

    cls = ollama.AsyncClient if asynchronous else ollama.Client
    options = {"timeout": httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
               **(client_options or {})}
    return cls(host=ollama_host(), **options)


_waited_for: set[str] = set()  # hosts whose first load already waited for the daemon


def same_tag(a: str | None, b: str) -> bool:
    def full(tag: str) -> str:
        return tag if ":" in tag else f"{tag}:latest"

    return a is not None and full(a) == full(b)


class OllamaBackend(Backend):
    """One models.yaml entry served by an Ollama daemon, plus any tag a request names."""

    kind = "Ollama"

    def __init__(self, entry: ModelEntry, client_options: dict[str, Any] | None = None):
        super().__init__(entry)
        options = Options.of(entry)
        if not options.ollama_tag:
            raise ModelLoadError(f"models.yaml gives {entry.id} no options.ollama_tag, so the "
                                 "Ollama backend cannot serve it; set LLM_BACKEND=transformers")
        self.tag = options.ollama_tag
        self.host = ollama_host()
        self.pull_missing = os.environ.get("OLLAMA_PULL", "") in ("1", "true", "yes")
        self.keep_alive = options.keep_alive
        self.client = ollama_client(asynchronous=True, client_options=client_options)
        # load-time calls, from worker threads
        self.sync = ollama_client(asynchronous=False, client_options=client_options)

    # errors ----------------------------------------------------------------------------
    def daemon_down(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the Ollama daemon at {self.host} is not reachable "
                           f"({type(exc).__name__}); start it (`ollama serve`) or point "
                           "OLLAMA_HOST at it", retry_after=5)

    def missing(self, tag: str) -> FieldError:
        return FieldError("model", f"model {tag!r} is not in the Ollama daemon at {self.host}; "
                          f"pull it (`ollama pull {tag}`) or set OLLAMA_PULL=1 so the runner "
                          "pulls it")

    def failed(self, exc: Any, tag: str) -> RunnerError:
        if exc.status_code == 404:
            return self.missing(tag)
        if exc.status_code == 400:
            return BadRequest(f"Ollama rejected the request for {tag}: {exc.error}")
        return InferenceError(f"Ollama failed on {tag}: {exc.error}")

    # load time (sync, in a worker thread) ------------------------------------------------
    def prepare(self) -> None:
        """Check the daemon has the model (pulling it when allowed) and load it there, so the
        first request does not wait for it; waits up to DAEMON_WAIT_S the first time for a
        daemon that is still starting."""
        import httpx
        from ollama import ResponseError

        wait = float(os.environ.get("OLLAMA_WAIT", DAEMON_WAIT_S))
        deadline = time.monotonic() + (0 if self.host in _waited_for else wait)
        _waited_for.add(self.host)
        while True:
            try:
                self.sync.show(self.tag)
                break
            except ResponseError as exc:
                if exc.status_code != 404:
                    raise self.failed(exc, self.tag) from exc
                if not self.pull_missing:
                    raise self.missing(self.tag) from exc
                self.pull_sync(self.tag)
                break
            except (ConnectionError, httpx.TransportError) as exc:
                if time.monotonic() >= deadline:
                    raise self.daemon_down(exc) from exc
                time.sleep(0.5)
        try:
            # An empty conversation loads the model and answers at once (done_reason "load").
            self.sync.chat(model=self.tag, messages=[], keep_alive=self.keep_alive)
        except ResponseError as exc:
            raise self.failed(exc, self.tag) from exc
        except (ConnectionError, httpx.TransportError) as exc:
            raise self.daemon_down(exc) from exc
        log.info("Ollama daemon at %s serves %s as %s", self.host, self.entry.id, self.tag)

    def pull_sync(self, tag: str) -> None:
        from ollama import ResponseError

        log.info("pulling %s into the Ollama daemon at %s", tag, self.host)
        try:
            for progress in self.sync.pull(tag, stream=True):
                log.debug("pull %s: %s", tag, progress.status)
        except ResponseError as exc:
            raise FieldError("model", f"could not pull {tag!r} into the Ollama daemon at "
                             f"{self.host}: {exc.error}") from exc

    async def pull(self, tag: str) -> None:
        from ollama import ResponseError

        log.info("pulling %s into the Ollama daemon at %s", tag, self.host)
        try:
            async with closing(await self.client.pull(tag, stream=True)) as progress:
                async for update in progress:
                    log.debug("pull %s: %s", tag, update.status)
        except ResponseError as exc:
            raise FieldError("model", f"could not pull {tag!r} into the Ollama daemon at "
                             f"{self.host}: {exc.error}") from exc

    # request time ------------------------------------------------------------------------
    def options(self, request: LLMRequest) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": request.temperature, "top_p": request.top_p,
                                   "num_predict": request.max_tokens, "seed": request.seed}
        if request.top_k is not None:
            options["top_k"] = 0 if request.top_k == -1 else request.top_k  # 0: no limit
        if request.stop:
            options["stop"] = request.stop_texts()
        return {k: v for k, v in options.items() if v is not None}

    async def generate(self, request: LLMRequest, stream: bool) -> AsyncIterator[Piece]:
        import httpx
        from ollama import ResponseError

        tag = request.model if is_ollama_tag(request.model) else self.tag
        call = dict(model=tag, messages=[m.model_dump() for m in request.messages],
                    options=self.options(request),
                    keep_alive=self.keep_alive if same_tag(tag, self.tag) else None)
        pulled = False
        while True:
            started = False
            try:
                if not stream:
                    r = await self.client.chat(**call, stream=False)
                    yield Piece(r.message.content or "", r.prompt_eval_count or 0,
                                r.eval_count or 0, finish_reason(r.done_reason))
                    return
                count = 0
                async with closing(await self.client.chat(**call, stream=True)) as parts:
                    async for part in parts:
                        started = True
                        if part.done:
                            # Ollama counts only at the end; before, one chunk is one token.
                            yield Piece(part.message.content or "", part.prompt_eval_count or 0,
                                        part.eval_count or count, finish_reason(part.done_reason))
                            return
                        count += 1
                        yield Piece(part.message.content or "", 0, count)
                return  # no final chunk: run/stream report it
            except ResponseError as exc:
                if exc.status_code == 404 and self.pull_missing and not pulled and not started:
                    await self.pull(tag)
                    pulled = True
                    continue
                raise self.failed(exc, tag) from exc
            except (ConnectionError, httpx.TransportError) as exc:
                raise self.daemon_down(exc) from exc

    # for the cache and /health -------------------------------------------------------------
    async def ping(self) -> None:
        import httpx

        try:
            await self.client.ps()
        except (ConnectionError, httpx.TransportError) as exc:
            raise self.daemon_down(exc) from exc

    def resident_bytes(self) -> int:
        """What the warm cache counts for this model: the daemon's memory for it."""
        return self.size_vram()

    def size_vram(self) -> int:
        """Bytes of VRAM the daemon holds for this entry's model (0 when not loaded), from
        /api/ps. Sync: call it from a worker thread."""
        return sum(int(m.size_vram or 0) for m in self.sync.ps().models
                   if same_tag(m.model or m.name, self.tag))

    def unload(self) -> None:
        """Ask the daemon to drop the model now (keep_alive 0). Sync, for a worker thread."""
        import httpx
        from ollama import ResponseError

        try:
            self.sync.chat(model=self.tag, messages=[], keep_alive=0)
        except (ResponseError, ConnectionError, httpx.TransportError) as exc:
            log.warning("could not unload %s from the Ollama daemon: %s", self.tag, exc)
