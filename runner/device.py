"""Which device models run on, and at which dtype."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from runner.footprint import walk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    type: str  # "cuda" or "cpu"
    index: int = 0
    compile: bool = False  # TORCH_COMPILE: pipelines that support it compile their hot modules

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @cached_property
    def torch(self):
        import torch

        return torch.device(self.type, self.index) if self.is_cuda else torch.device("cpu")

    def dtype(self, name: str):
        """The serving dtype: the entry's half precision on CUDA, float32 on CPU, where half
        precision is slower and some kernels are missing."""
        import torch

        return getattr(torch, name) if self.is_cuda else torch.float32


def resolve(requested: str, compile: bool = False) -> Device:
    """NVML and torch's metadata decide `auto` without importing torch, so the port binds at
    once; a GPU whose CUDA is broken then fails the warm-up and /health says ERROR."""
    from runner.hardware import gpu_count, torch_is_cpu_build

    if compile and (missing := missing_compile_toolchain()):
        log.warning("TORCH_COMPILE is ignored: %s. torch.compile builds its kernels with a C "
                    "compiler against Python's headers (install gcc, g++ and python3-dev; the "
                    "images have them); models run uncompiled.", missing)
        compile = False
    if requested == "cpu" or (requested == "auto" and gpu_count() == 0):
        return Device("cpu", compile=compile)
    if requested == "auto" and torch_is_cpu_build():
        # A CPU wheel cannot use the GPU NVML sees: every load would fail, so serve on CPU.
        log.warning("DEVICE=auto: NVML sees a GPU but torch is a CPU build; serving on CPU")
        return Device("cpu", compile=compile)
    return Device("cuda", compile=compile)


def missing_compile_toolchain() -> str | None:
    """What torch.compile lacks here to build kernels, or None. Inductor compiles its CPU
    kernels as C++ and Triton its GPU launchers as C, both against Python.h, at run time: a
    container with only a Python runtime fails at the first compiled call, not at start."""
    compilers = [os.environ.get("CC"), shutil.which("gcc"), shutil.which("clang")]
    if not any(compilers):
        return "no C compiler (gcc, clang or $CC)"
    # the headers Triton includes (Debian's posix_local scheme has none of its own)
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)
    if not os.path.isfile(os.path.join(include["include"], "Python.h")):
        return f"no Python headers ({include['include']}/Python.h)"
    return None


def configure_for_cuda() -> None:
    """TF32 for the float32 work that remains on a GPU (the x4 upscaler's VAE, SAM2's weights
    under autocast): tensor-core speed at a precision diffusion and vision models do not miss."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def configure_for_tiny() -> None:
    """One torch thread: on 2 shared cores the default makes tiny models 10-40x slower."""
    import torch

    torch.set_num_threads(1)


def cuda_total(index: int) -> int | None:
    """Device bytes as CUDA reports them, when NVML cannot say (no NVML library, a device it
    cannot match): imports torch and starts CUDA, so it is the fallback, not the way."""
    try:
        import torch

        return int(torch.cuda.get_device_properties(index).total_memory)
    except Exception:  # noqa: BLE001  (no driver, no such device: the caller falls back)
        return None


def empty_cache() -> None:
    """Give the allocator's cached blocks back to the device, so others (and NVML) see them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def move_model(model: Any, target: Any) -> None:
    """Move every torch module reachable from `model` to `target` in place (a diffusers
    pipeline's components, a wrapper's model): the cache's demotion to CPU RAM and back."""
    import torch

    for obj in walk(model):
        if isinstance(obj, torch.nn.Module):
            obj.to(target)
