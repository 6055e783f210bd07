"""What either backend is once loaded: the network, its input and mask sizes, and the image
embeddings kept for further prompts on the same image."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any

import numpy as np

from pipelines.segment_anything_2._prompts import Prompts
from runner.context import RunContext
from runner.device import Device


class EmbeddingCache:
    """Image embeddings of the last `size` images, least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class Segmenter:
    """A loaded SAM2 (either backend) and its embedding cache. `embed` runs the image encoder;
    `decode` the prompt encoder and mask decoder, returning mask logits at the input size
    (C, H, W), scores (C,) and low-res logits (C, M, M), all float32 numpy."""

    def __init__(self, model_id: str, device: Device, mask_size: tuple[int, int],
                 cache_size: int):
        self.model_id = model_id
        self.device = device
        self.mask_size = mask_size
        self.embeddings = EmbeddingCache(cache_size)
        self.encoded = 0  # image-encoder runs: cache misses (tests and logs read it)

    def autocast(self):
        """bf16 autocast on CUDA, as the official predictor runs; nothing on CPU."""
        import torch

        if self.device.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def embedding(self, pixels: np.ndarray, ctx: RunContext) -> Any:
        key = hashlib.sha256()
        key.update(f"{self.model_id}\0{pixels.shape}\0".encode())
        key.update(np.ascontiguousarray(pixels).data)
        digest = key.hexdigest()
        cached = self.embeddings.get(digest)
        if cached is not None:
            return cached
        with ctx.stage("embed"):
            embedding = self.embed(pixels)
            if self.device.is_cuda:
                import torch

                torch.cuda.synchronize(self.device.torch)  # so the stage times the encoder
        self.encoded += 1
        self.embeddings.put(digest, embedding)
        return embedding

    def forget_images(self) -> None:
        """Drop the device tensors kept for images already seen (moving them is not worth it:
        a miss recomputes them)."""
        self.embeddings.clear()

    def embed(self, pixels: np.ndarray) -> Any:
        raise NotImplementedError

    def decode(self, embedding: Any, prompts: Prompts, multimask: bool,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError
