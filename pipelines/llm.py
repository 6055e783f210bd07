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

import abc
import asyncio
import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from pydantic import (
    BaseModel,
    Field,
    field_validator,
)

from runner import checkpoints
from runner.device import Device
from runner.errors import (
    BadRequest,
    FieldError,
    InferenceError,
    ModelLoadError,
    RunnerError,
    Unavailable,
)
from runner.hub import ModelFiles, writing_snapshot
from runner.protocol import LLMChoice, LLMMessage, LLMResponse, LLMTokenUsage
from runner.registry import ModelEntry

NAME = "llm"
OPERATION_ID = "genLLM"
SUMMARY = "LLM"
OPENAI_CHAT = True  # runner/openai.py serves this module as /v1/chat/completions
REQUIRES = ("ollama", "transformers>=4.56")
# go-livepeer's worker reads only these on /llm: a 422 it decodes but answers its client as
# "200 null" (ai/worker/worker.go), so a schema error here is a 400 naming the field.
ERROR_STATUSES = (400, 401, 500)

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
DAEMON_WAIT_S = 30.0  # how long the first load waits for a daemon that is still starting
CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0
STREAM_DRAIN_S = 30.0  # how long a closed stream waits for its generation thread to stop
MIN_SAMPLING_TEMPERATURE = 1e-4  # below it, the transformers backend decodes greedily

# Extra keyword arguments for the Ollama clients (httpx.Client / AsyncClient options). Tests put
# a `transport` here to reach an in-process double; nothing else needs to touch it.
CLIENT_OPTIONS: dict[str, Any] = {}


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


Request = LLMRequest
Response = LLMResponse


def is_ollama_tag(name: str) -> bool:
    """`llama3.1:8b`, `qwen2.5:7b-instruct-q4_K_M`: a colon, which no hub id has."""
    return ":" in name


# -- what every backend does -----------------------------------------------------------------

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


class Backend(abc.ABC):
    """A loaded chat model. Subclasses implement `generate`; `run` and `stream` shape its
    pieces into the contract's responses."""

    kind = ""

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    @abc.abstractmethod
    def generate(self, request: LLMRequest, stream: bool) -> AsyncIterator[Piece]:
        """The answer as pieces of text, the last one with its finish_reason and usage."""

    async def run(self, request: LLMRequest, ctx: Any) -> LLMResponse:
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

    async def stream(self, request: LLMRequest, ctx: Any) -> AsyncIterator[LLMResponse]:
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


# -- the Ollama backend ----------------------------------------------------------------------

def ollama_host() -> str:
    return os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


def ollama_client(asynchronous: bool = True) -> Any:
    """An Ollama client for OLLAMA_HOST; CLIENT_OPTIONS go to its httpx client."""
    import httpx
    import ollama

    cls = ollama.AsyncClient if asynchronous else ollama.Client
    options = {"timeout": httpx.Timeout(None, connect=CONNECT_TIMEOUT_S), **CLIENT_OPTIONS}
    return cls(host=ollama_host(), **options)


_waited_for: set[str] = set()  # hosts whose first load already waited for the daemon


def same_tag(a: str | None, b: str) -> bool:
    def full(tag: str) -> str:
        return tag if ":" in tag else f"{tag}:latest"

    return a is not None and full(a) == full(b)


class OllamaBackend(Backend):
    """One models.yaml entry served by an Ollama daemon, plus any tag a request names."""

    kind = "Ollama"

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        tag = entry.options.get("ollama_tag")
        if not tag:
            raise ModelLoadError(f"models.yaml gives {entry.id} no options.ollama_tag, so the "
                                 "Ollama backend cannot serve it; set LLM_BACKEND=transformers")
        self.tag = str(tag)
        self.host = ollama_host()
        self.pull_missing = os.environ.get("OLLAMA_PULL", "") in ("1", "true", "yes")
        # -1: the model stays in the daemon until the runner's cache unloads it (keep_alive 0).
        self.keep_alive = entry.options.get("keep_alive", -1)
        self.client = ollama_client(asynchronous=True)
        self.sync = ollama_client(asynchronous=False)  # load-time calls, from worker threads

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

    def daemon_vram(self) -> int:
        """Bytes of VRAM the daemon holds for all its models: memory the cache does not own."""
        return sum(int(m.size_vram or 0) for m in self.sync.ps().models)

    def unload(self) -> None:
        """Ask the daemon to drop the model now (keep_alive 0). Sync, for a worker thread."""
        import httpx
        from ollama import ResponseError

        try:
            self.sync.chat(model=self.tag, messages=[], keep_alive=0)
        except (ResponseError, ConnectionError, httpx.TransportError) as exc:
            log.warning("could not unload %s from the Ollama daemon: %s", self.tag, exc)


# -- the transformers backend ----------------------------------------------------------------

class StopScanner:
    """Cuts streamed text at the first stop text, holding back a tail that could be the start
    of one, so no part of a stop text is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop text was found."""
        buf = self.held + text
        hits = [buf.find(s) for s in self.stops if s in buf]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


_DONE = object()  # the generation thread's last message


class TransformersBackend(Backend):
    """A causal LM and its tokenizer; one generation at a time (a second request waits for the
    first: two generate calls on one model share its memory and its tokenizer)."""

    kind = "transformers"

    def __init__(self, entry: ModelEntry, model: Any, tokenizer: Any, device: Device):
        super().__init__(entry)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(i) for i in eos + [tokenizer.eos_token_id] if i is not None}
        self._turn = threading.Lock()  # held by the generation thread

    def encode(self, messages: list[LLMMessage]) -> Any:
        from jinja2 import TemplateError

        turns = [m.model_dump() for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        except TemplateError as exc:
            if turns[0]["role"] == "system" and len(turns) > 1:
                # Templates without a system role (Gemma): fold it into the first user turn.
                merged = [{**turns[1], "content": f"{turns[0]['content']}\n\n"
                           f"{turns[1]['content']}"}, *turns[2:]]
                try:
                    return self.tokenizer.apply_chat_template(
                        merged, add_generation_prompt=True, return_tensors="pt",
                        return_dict=True)
                except TemplateError:
                    pass
            raise BadRequest(f"{self.entry.id}'s chat template rejects these messages: "
                             f"{exc}") from exc

    def sampling(self, request: LLMRequest, max_new_tokens: int) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        # Near 0 sampling is greedy anyway, and logits / 1e-300 overflow to inf (NaN
        # probabilities, a failed multinomial): such temperatures decode greedily.
        greedy = (request.temperature or 0) < MIN_SAMPLING_TEMPERATURE
        config.update(
            max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=1.0 if greedy else request.temperature,
            top_p=1.0 if greedy or request.top_p is None else request.top_p,
            top_k=None if greedy or request.top_k in (None, -1) else request.top_k,
            pad_token_id=self.tokenizer.pad_token_id or sorted(self.eos_ids)[0],
        )
        return config

    def work(self, request: LLMRequest, emit: Callable[[Any], None],
             stop: threading.Event) -> None:
        """The generation thread: tokenise, generate with a streamer, then the final piece;
        any exception goes to the consumer; `_DONE` always comes last."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        class Streamer(TextStreamer):
            """Sends each piece of decoded text with the count of tokens generated so far."""

            generated = 0

            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt:
                    self.generated += int(value.numel())
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    emit(Piece(text, prompt_tokens, self.generated))

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        try:
            with self._turn:
                if stop.is_set():
                    return
                encoded = self.encode(request.messages)
                prompt_tokens = int(encoded["input_ids"].shape[-1])
                room = self.context - prompt_tokens
                if room < 1:
                    raise BadRequest(f"the conversation is {prompt_tokens} tokens long; "
                                     f"{self.entry.id} reads at most {self.context - 1}")
                max_new = min(int(request.max_tokens or 256), room)
                streamer = Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                with torch.inference_mode():
                    out = self.model.generate(
                        **encoded.to(self.device.torch),
                        generation_config=self.sampling(request, max_new), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Stopped()]))
                new = out[0, prompt_tokens:]
                ended = len(new) > 0 and int(new[-1]) in self.eos_ids
                reason = "length" if len(new) >= max_new and not ended else "stop"
                emit(Piece("", prompt_tokens, int(len(new)), reason))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            emit(exc)
        finally:
            emit(_DONE)

    async def generate(self, request: LLMRequest, stream: bool) -> AsyncIterator[Piece]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                stop.set()

        thread = threading.Thread(target=self.work, args=(request, emit, stop), daemon=True,
                                  name=f"llm-generate-{self.entry.id}")
        thread.start()
        scanner = StopScanner(request.stop_texts())
        stopped = done = False
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason:
                    # A stop text ends the answer with "stop" whatever the thread saw.
                    text = "" if stopped else scanner.flush()
                    yield Piece(text, item.prompt_tokens, item.completion_tokens,
                                "stop" if stopped else item.finish_reason)
                    continue
                if stopped:
                    continue
                text, stopped = scanner.feed(item.text)
                if stopped:
                    stop.set()
                if text:
                    yield Piece(text, item.prompt_tokens, item.completion_tokens)
            done = True
        finally:
            stop.set()  # a consumer that went away stops the generation at the next token
            if not done:
                with anyio.move_on_after(STREAM_DRAIN_S, shield=True):
                    while await queue.get() is not _DONE:
                        pass


def transformers_backend(entry: ModelEntry, files: ModelFiles, device: Device
                         ) -> TransformersBackend:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = files.folder(entry.main.repo, entry.main.revision)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{entry.id} has no chat template in {folder}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=device.dtype(entry.dtype))
    model.to(device.torch).eval()
    return TransformersBackend(entry, model, tokenizer, device)


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
    tag, store = entry.options.get("ollama_tag"), os.environ.get("OLLAMA_MODELS")
    if not tag:
        return [f"models.yaml gives {entry.id} no options.ollama_tag for the Ollama backend"]
    return checkpoints.ollama_problems(str(tag), Path(store)) if store else []


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> Backend:
    if backend_name(entry, files) == "transformers":
        return transformers_backend(entry, files, device)
    backend = OllamaBackend(entry)
    backend.prepare()
    return backend


async def run(model: Backend, request: LLMRequest, ctx: Any) -> LLMResponse:
    # 1. The backend generates (an Ollama call, or a generation thread); 2. one response
    #    with the whole answer, its finish_reason and the backend's token counts.
    if is_ollama_tag(request.model) and not isinstance(model, OllamaBackend):
        raise tag_needs_ollama(request.model, model)
    return await model.run(request, ctx)


async def stream(model: Backend, request: LLMRequest, ctx: Any) -> AsyncIterator[LLMResponse]:
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


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The config measured in ../shared/notes/tiny-models-transformers.md ("e. Llama chat"), with
# 1024 positions so a conversation and the default 256 new tokens fit.

TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|end|>"]
TINY_CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "I am a tiny language model with random weights, so my answers are noise.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a cat and a dog who live on a small boat.",
]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_chat_model() -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=TINY_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Sampling by default: greedy decoding of random weights repeats one token forever.
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=1.0, top_k=None,
                                   max_new_tokens=32)
    return model, tokenizer


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model, tokenizer = tiny_chat_model()
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

