"""Device choice: auto takes CUDA only when torch sees it; an absent CUDA is an error, never a silent CPU run."""

from __future__ import annotations

import pytest
import torch

from autosquash.errors import AutosquashError
from autosquash.models.device import peak_rss_bytes, resolve_device, to_compute


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AutosquashError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_auto_is_cuda_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(AutosquashError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")


def test_to_compute_follows_the_model_and_keeps_indices_integral(tiny_model):
    half = tiny_model.to(torch.bfloat16)
    assert to_compute(torch.ones(3), half).dtype == torch.bfloat16
    assert to_compute(torch.arange(3, dtype=torch.int16), half).dtype == torch.int16


def test_peak_rss_is_this_process_memory():
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched: the peak is at least that
    assert peak_rss_bytes() > big.numel()


def test_a_model_is_counted_as_transformers_builds_it(tiny_model):
    from autosquash.models.arch import Arch

    assert Arch.from_config(tiny_model.config).n_params == sum(p.numel() for p in tiny_model.parameters())


def test_a_model_larger_than_the_memory_available_is_refused_unless_told_to_load_it(monkeypatch, tiny_arch):
    import autosquash.models.device as device

    assert device.available_memory_bytes() > 0  # this machine says (Linux's MemAvailable here)
    need = tiny_arch.n_params * 4 * 1.25
    monkeypatch.setattr(device, "available_memory_bytes", lambda: int(need) - 1)
    with pytest.raises(AutosquashError, match=r"^model tiny needs about \d+ MB in float32 .*AUTOSQUASH_IGNORE_MEMORY"):
        device.check_host_memory(tiny_arch, "tiny")
    monkeypatch.setattr(device, "available_memory_bytes", lambda: int(need) + 1)
    device.check_host_memory(tiny_arch, "tiny")
    monkeypatch.setattr(device, "available_memory_bytes", lambda: None)  # a machine that does not say
    device.check_host_memory(tiny_arch, "tiny")
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 0)
    monkeypatch.setenv("AUTOSQUASH_IGNORE_MEMORY", "1")
    device.check_host_memory(tiny_arch, "tiny")
