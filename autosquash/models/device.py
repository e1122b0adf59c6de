"""Where a model computes: the device an experiment asks for, resolved against what torch sees, and the
peak memory a process used (host RSS, and the accelerator's own when there is one)."""

from __future__ import annotations

import gc
import os
import resource
import sys

import torch

from autosquash.errors import AutosquashError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when torch sees a GPU, else the CPU; `cuda` without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AutosquashError("hardware.device is cuda, but torch sees no CUDA GPU here (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise AutosquashError(f"hardware.device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights sit on."""
    return next(model.parameters()).device


def to_compute(t: torch.Tensor, like: torch.nn.Module | torch.Tensor) -> torch.Tensor:
    """`t` on the device of `like` (a model or a tensor), floating tensors in its dtype too."""
    ref = next(like.parameters()) if isinstance(like, torch.nn.Module) else like
    return t.to(ref.device, ref.dtype) if t.is_floating_point() else t.to(ref.device)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release_freed_memory() -> None:
    """Free what the last trial left in reference cycles (peft's wrappers hold some) before the next builds.

    Not glibc's malloc_trim: handing the heap back made every trial fault its memory in again (measured on
    the default search, 2 cores: build, heal and score each 10-70 % slower), for no lower peak.
    """
    gc.collect()
