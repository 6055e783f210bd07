"""The transformers backend (CPU tiny mode, and a GPU fallback without Ollama): a causal LM with
its chat template, generating in a thread of its own and streaming through a token streamer,
one generation at a time per model."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from pipelines.llm._backend import Backend
from pipelines.llm._wire import LLMRequest, Piece
from runner.device import Device
from runner.errors import BadRequest, ModelLoadError
from runner.hub import ModelFiles
from runner.protocol import LLMMessage
from runner.registry import ModelEntry

STREAM_DRAIN_S = 30.0  # how long a closed stream waits for its generation thread to stop
MIN_SAMPLING_TEMPERATURE = 1e-4  # below it, the transformers backend decodes greedily


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


DEFAULT_MAX_TOKENS = 256  # an answer's length when the request does not say


def kv_bytes_per_token(config: dict[str, Any], float_bytes: int) -> int:
    """Device bytes the KV cache grows by per token, from the model's config.json: keys and
    values of every layer at `float_bytes` a float (grouped-query models keep fewer heads)."""
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or 0
    head_dim = config.get("head_dim") or (
        config.get("hidden_size", 0) // max(1, config.get("num_attention_heads") or 1))
    return 2 * int(config.get("num_hidden_layers") or 0) * int(heads) * int(head_dim) \
        * float_bytes


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
                max_new = min(int(request.max_tokens or DEFAULT_MAX_TOKENS), room)
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
