"""What the cache can learn about the device's memory beyond its own bookkeeping: the bytes
others hold there, and the working memory a run really used.

`CudaMemory` reads NVML and torch's allocator; `HostMemory` (CPU serving) knows neither, so
the budget there is what settings say. Tests pass their own fake with the same three methods.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Memory(Protocol):
    def others(self) -> int:
        """Bytes in use on the device that this process's allocator does not hold: other
        processes, daemons such as Ollama, CUDA contexts."""

    def allocated(self) -> int | None:
        """Bytes this process's tensors hold on the device now; None when unknown."""

    def measured(self, fn: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        """Run `fn` and return its result with the peak bytes it allocated beyond what was
        allocated when it started (None when unknown)."""

    async def measured_async(self, fn: Callable[..., Awaitable[T]], *args: Any
                             ) -> tuple[T, int | None]:
        """`measured` for a coroutine function: awaited on the event loop."""


class HostMemory:
    def others(self) -> int:
        return 0

    def allocated(self) -> int | None:
        return None

    def measured(self, fn: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        return fn(*args), None

    async def measured_async(self, fn: Callable[..., Awaitable[T]], *args: Any
                             ) -> tuple[T, int | None]:
        return await fn(*args), None


class CudaMemory:
    def __init__(self, index: int = 0):
        self.index = index

    def others(self) -> int:
        import torch

        from runner.hardware import gpu_used

        # gpu_used maps torch's index to NVML's (NVML ignores CUDA_VISIBLE_DEVICES)
        used = gpu_used(self.index)
        if used is None:
            return 0
        # The allocator's cached blocks count as ours: our next run reuses them. Not
        # initialised means this process holds nothing yet (asking would create a context).
        ours = torch.cuda.memory_reserved(self.index) if torch.cuda.is_initialized() else 0
        return max(0, used - ours)

    def allocated(self) -> int | None:
        import torch

        return torch.cuda.memory_allocated(self.index) if torch.cuda.is_initialized() else 0

    def measured(self, fn: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        import torch

        torch.cuda.reset_peak_memory_stats(self.index)
        start = torch.cuda.memory_allocated(self.index)
        result = fn(*args)
        return result, max(0, torch.cuda.max_memory_allocated(self.index) - start)

    async def measured_async(self, fn: Callable[..., Awaitable[T]], *args: Any
                             ) -> tuple[T, int | None]:
        """The peak is the device's over the await, other runs' included; the cache marks a
        reservation that overlapped others as shared and does not learn from it."""
        import torch

        torch.cuda.reset_peak_memory_stats(self.index)
        start = torch.cuda.memory_allocated(self.index)
        result = await fn(*args)
        return result, max(0, torch.cuda.max_memory_allocated(self.index) - start)
