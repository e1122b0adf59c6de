"""Where a model computes: the device an experiment asks for, resolved against what torch sees, and the
peak memory a process used (host RSS, and the accelerator's own when there is one)."""

from __future__ import annotations

import gc
import os
import resource
import sys
from pathlib import Path

import torch

from autosquash.errors import AutosquashError
from autosquash.models.arch import Arch

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


def driver_device(name: str) -> torch.device:
    """Where a search's driver computes its own share (loading, calibration, reference logits) when its trials
    run on a Ray cluster: CUDA when the experiment allows it and this machine has one, else the CPU; never an
    error, since the GPUs a `cuda` experiment asks for may sit on other nodes (each worker resolves the
    experiment's device on its own node, with resolve_device)."""
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


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


# What loading a model holds beyond its float32 parameters (the decoded tensors in flight, the interpreter and
# its libraries), as a share of them.
LOAD_MARGIN = 0.25
IGNORE_MEMORY = "AUTOSQUASH_IGNORE_MEMORY"  # set to 1: load whatever the check says


def available_memory_bytes() -> int | None:
    """Memory a new allocation can have without swapping: Linux's MemAvailable, within this process's cgroup
    (v2) limit where it has one; psutil's figure elsewhere; None when neither says."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            found = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if found is None:
        try:
            import psutil
        except ImportError:
            return None
        found = int(psutil.virtual_memory().available)
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found = min(found, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return found


def check_host_memory(arch: Arch, model: str) -> None:
    """Refuse, before its weights load, a model whose float32 parameters and LOAD_MARGIN exceed the memory this
    machine has available (nothing to refuse where that is unknown, or where AUTOSQUASH_IGNORE_MEMORY=1)."""
    if os.environ.get(IGNORE_MEMORY) == "1":
        return
    available = available_memory_bytes()
    need = int(arch.n_params * 4 * (1 + LOAD_MARGIN))
    if available is not None and need > available:
        raise AutosquashError(
            f"model {model} needs about {_size(need)} in float32 ({arch.n_params / 1e6:.0f}M parameters, "
            f"{LOAD_MARGIN:.0%} more to load them); this machine has {_size(max(available, 0))} available "
            f"({IGNORE_MEMORY}=1 loads it anyway)"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.0f} MB"


def release_freed_memory() -> None:
    """Free what the last trial left in reference cycles (peft's wrappers hold some) before the next builds.

    Not glibc's malloc_trim: handing the heap back made every trial fault its memory in again (measured on
    the default search, 2 cores: build, heal and score each 10-70 % slower), for no lower peak.
    """
    gc.collect()
