"""Transform image files to text.

BLIP captioning (`Salesforce/blip-image-captioning-large` and `-base`). An empty prompt asks for
an unconditional caption; a prompt ("a picture of") is the start of the caption, and the
answer is the whole decoded text, prompt included, as the reference runner returns it.

Concurrent requests share one `generate` call: `run()` executes in worker threads (up to the
entry's `max_concurrency` at once), decodes and preprocesses its image there, and hands the
tensors to the model's `Batcher`. The first request of a batch waits `batch_window_ms` for
others (or until `max_batch_size` have joined), then one call captions them all, and each
caller gets its own text back. Batches run one at a time, first come first served, and a
batch keeps collecting while it waits for the one before it to finish, so under load the
batches fill up by themselves.

Only prompts of the same token length share a batch: BLIP's `generate` overwrites the first
column with its BOS token and drops the last one (the [SEP]), which is only right when no row
is padded, and its decoder's absolute positions make left padding change the output. Empty
prompts are all one group (`[CLS] [SEP]`, which generate turns into a lone BOS).

An exception in the batched call reaches every caller of that batch (a 500 each); the batcher
goes on with the next batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

from pipelines import _working_memory as wm
from pipelines._fields import ModelId
from runner.context import RunContext
from runner.device import Device
from runner.errors import BadRequest
from runner.hub import ModelFiles, writing_snapshot
from runner.media import decode_image
from runner.options import Options as BaseOptions
from runner.protocol import Upload
from runner.registry import ModelEntry
from runner.sample import NoiseImage, Sample, Scale

NAME = "image-to-text"
REQUIRES = ("transformers>=4.56",)
# go-livepeer's client decodes 413 on this route (an upload too large).
ERROR_STATUSES = (400, 401, 413, 422, 500)
MAX_PROMPT_CHARS = 1000  # the real models read at most 512 tokens, caption included
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WINDOW_MS = 10.0
DEFAULT_MAX_NEW_TOKENS = 50
DEFAULT_NUM_BEAMS = 1

CaptionPrompt = Annotated[str, Field(
    max_length=MAX_PROMPT_CHARS, description="Text prompt(s) to guide transformation: the "
    "start of the caption ('a picture of'); '' for an unconditional caption.")]


class ImageToTextParams(BaseModel):
    image: Upload = Field(description="Uploaded image to transform with the pipeline.")
    prompt: CaptionPrompt = ""
    model_id: ModelId = ""


class ImageToTextResponse(BaseModel):
    """Response model for text generation."""

    text: str = Field(description="The generated text.")


Request = ImageToTextParams
Response = ImageToTextResponse


class Options(BaseOptions):
    """models.yaml `options:` of image-to-text models."""

    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1,
                                description="Most tokens a caption adds to its prompt.")
    num_beams: int = Field(DEFAULT_NUM_BEAMS, ge=1, description="Beam search width (1: greedy).")
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1,
                                description="Most requests captioned in one generate call.")
    batch_window_ms: float = Field(DEFAULT_BATCH_WINDOW_MS, ge=0, description="How long the "
                                   "first request of a batch waits for others to join.")


# -- the batcher ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Batch:
    key: Hashable
    items: list[Any] = field(default_factory=list)
    closed: bool = False  # no one joins a closed batch
    started: bool = False  # its call has begun (or it failed before)
    future: Future = field(default_factory=Future)  # the results, in the order items joined


class Batcher:
    """Runs `fn(items) -> results` (one result per item, same order) once for each batch of
    concurrent `submit` calls with the same key.

    Thread-safe, no thread of its own: the first caller of a batch leads it. It waits up to
    `window_s` for others to join (less when `max_batch_size` join first), queues the batch,
    and when every batch queued before it has run, closes it and calls `fn`. The other
    callers wait on the batch's future. A failure of `fn` is raised in every caller of the
    batch; the next batch runs as usual.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int =
                 DEFAULT_MAX_BATCH_SIZE, window_s: float = DEFAULT_BATCH_WINDOW_MS / 1000):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._fn = fn
        self.max_batch_size = int(max_batch_size)
        self.window_s = max(0.0, float(window_s))
        self._cond = threading.Condition()
        self._open: dict[Hashable, _Batch] = {}  # the batch each key's newcomers join
        self._queue: deque[_Batch] = deque()  # batches whose window is over, in turn order
        self._running = False
        self._pending = 0
        # Counters: batched calls made, items they carried, the largest batch, failed calls.
        self.calls = 0
        self.items = 0
        self.largest = 0
        self.failures = 0

    @property
    def pending(self) -> int:
        """Items submitted whose batch has not started running."""
        with self._cond:
            return self._pending

    def submit(self, item: Any, key: Hashable = None) -> Any:
        """`item`'s result, computed in a batch with others submitted under the same key."""
        with self._cond:
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch(key)
            index = len(batch.items)
            batch.items.append(item)
            self._pending += 1
            if len(batch.items) >= self.max_batch_size:
                self._close(batch)
        if leader:
            return self._lead(batch)[index]
        return batch.future.result()[index]

    def _close(self, batch: _Batch) -> None:
        """Under the lock: the batch takes no more items."""
        batch.closed = True
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        self._cond.notify_all()

    def _lead(self, batch: _Batch) -> list[Any]:
        try:
            with self._cond:
                # 1. Collect: others join until the window ends or the batch is full.
                deadline = time.monotonic() + self.window_s
                while not batch.closed and (remaining := deadline - time.monotonic()) > 0:
                    self._cond.wait(remaining)
                # 2. Wait for our turn; the batch stays open (and fills) meanwhile.
                self._queue.append(batch)
                while self._running or self._queue[0] is not batch:
                    self._cond.wait()
                self._queue.popleft()
                self._running = True
                self._close(batch)
                batch.started = True
                self._pending -= len(batch.items)
            # 3. One call for the whole batch, outside the lock.
            try:
                results = list(self._fn(list(batch.items)))
                if len(results) != len(batch.items):
                    raise RuntimeError(f"batched call returned {len(results)} results for "
                                       f"{len(batch.items)} items")
            finally:
                with self._cond:
                    self._running = False
                    self.calls += 1
                    self.items += len(batch.items)
                    self.largest = max(self.largest, len(batch.items))
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self.failures += 1
                if batch in self._queue:
                    self._queue.remove(batch)
                self._close(batch)
                if not batch.started:
                    batch.started = True
                    self._pending -= len(batch.items)
            batch.future.set_exception(exc)
            raise
        batch.future.set_result(results)
        return results


# -- the model -----------------------------------------------------------------------------

@dataclass
class CaptionItem:
    """One request, preprocessed on its own worker thread."""

    pixel_values: Any  # float tensor (1, 3, H, W), on the CPU
    input_ids: list[int]  # the prompt's tokens, [CLS] ... [SEP]


@dataclass
class CaptionModel:
    """A loaded BLIP captioner and the batcher that feeds its generate calls."""

    model: Any
    processor: Any
    device: Device
    max_new_tokens: int
    num_beams: int
    batcher: Batcher = field(init=False)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.batcher = Batcher(self.caption_batch, self.max_batch_size,
                               self.batch_window_ms / 1000)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def prepare(self, image: Any, prompt: str) -> CaptionItem:
        """Resize and normalise the image, tokenize the prompt (400 when it leaves no room
        for a caption). Runs in the request's worker thread, in parallel with others."""
        pixel_values = self.processor.image_processor(images=image,
                                                      return_tensors="pt")["pixel_values"]
        # Rust tokenizers must not be called from two threads at once ("Already borrowed").
        with self._tokenizer_lock:
            input_ids = list(self.processor.tokenizer(prompt)["input_ids"])
        # generate drops the trailing [SEP]: len(input_ids) - 1 positions hold the prompt.
        if len(input_ids) - 1 >= self.max_positions:
            raise BadRequest(f"the prompt is {len(input_ids)} tokens long; this model reads at "
                             f"most {self.max_positions - 2} prompt tokens")
        return CaptionItem(pixel_values, input_ids)

    def caption_batch(self, items: list[CaptionItem]) -> list[str]:
        """One generate call for items whose prompts have the same token length."""
        import torch

        model = self.model
        pixel_values = torch.cat([item.pixel_values for item in items]).to(
            self.device.torch, dtype=model.dtype)
        input_ids = torch.tensor([item.input_ids for item in items], dtype=torch.long,
                                 device=self.device.torch)
        prompt_positions = input_ids.shape[1] - 1
        with torch.inference_mode():
            out = model.generate(
                pixel_values=pixel_values, input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max(1, min(self.max_new_tokens,
                                          self.max_positions - prompt_positions)),
                num_beams=self.num_beams, do_sample=False,
            )
        return self.processor.batch_decode(out, skip_special_tokens=True)


def load(entry: ModelEntry, files: ModelFiles, device: Device) -> CaptionModel:
    from transformers import BlipForConditionalGeneration, BlipProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = files.folder(entry.main.repo, entry.main.revision)
    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder, dtype=device.dtype(entry.dtype))
    model.to(device.torch).eval()
    options = Options.of(entry)
    return CaptionModel(
        model, processor, device, max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams, max_batch_size=options.max_batch_size,
        batch_window_ms=options.batch_window_ms,
    )


def run(model: CaptionModel, request: ImageToTextParams,
        ctx: RunContext) -> ImageToTextResponse:
    # 1. Decode the upload (400 if undecodable or over MAX_IMAGE_PIXELS).
    image = decode_image(request.image.file.read(), ctx.settings.max_image_pixels)
    # 2. Preprocess here, in parallel with other requests: image to tensor, prompt to tokens.
    item = model.prepare(image, request.prompt)
    # 3. Join a batch of requests whose prompts have as many tokens, and wait for its one
    #    generate call (the time includes waiting for the batch to fill and for its turn).
    with ctx.stage("caption"):
        text = model.batcher.submit(item, key=len(item.input_ids))
    # 4. The whole decoded text: a conditional caption starts with its prompt.
    return ImageToTextResponse(text=text.strip())


# -- tiny checkpoint for CPU mode ------------------------------------------------------------
# The config measured in ../shared/notes/tiny-models-transformers.md ("b. BLIP"), with 128
# text positions so a prompt and the 50 new tokens of models.yaml fit.

TINY_WORDS = ("a picture of photo an the cat dog sitting on with red blue green small big "
              "image there is in front").split()


def tiny_captioner() -> tuple[Any, Any]:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
             *(f"##{c}" for c in letters), *(w for w in TINY_WORDS if w not in letters)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = BlipTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
        projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=2, image_size=32,
                              patch_size=8)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    return model, processor


def build_tiny(entry: ModelEntry, model_dir: Path) -> None:
    model, processor = tiny_captioner()
    with writing_snapshot(model_dir, entry.main.repo) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def working_memory(entry: ModelEntry, files: ModelFiles, request: Any, float_bytes: int) -> int:
    """One image at the model's fixed input size; batched requests each reserve their own:
    BLIP-large's figure (384 px in patches of 16, 1024 channels), scaled by this model's
    patches and width."""
    vision = wm.model_config(files, entry.main.repo, entry.main.revision).get("vision_config")
    vision = vision if isinstance(vision, dict) else {}
    side = wm.width(vision, 384, "image_size") / wm.width(vision, 16, "patch_size")
    return wm.fixed(128, float_bytes, scale=side * side * wm.width(vision, 1024, "hidden_size"))


def sample_request(scale: Scale) -> Sample:
    """A caption of a noise image of the scale's size (unset: BLIP's 384x384)."""
    side = (scale.size, scale.size) if scale.size else (384, 384)
    return Sample({"model_id": scale.model}, uploads={"image": NoiseImage(*side)},
                  params={"image_size": side})
