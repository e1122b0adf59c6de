"""An experiment's hardware section: validated, resolved before anything is written, and what Ray is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autosquash.errors import AutosquashError
from autosquash.search.experiment import load_experiment
from autosquash.search.study import SearchOptions, _resources, run_search

ROOT = Path(__file__).resolve().parents[2]


def _experiment(tmp_path, hardware: str):
    """The smoke experiment with a hardware section, written where its relative paths still resolve."""
    text = (ROOT / "experiments/smoke.yaml").read_text() + f"hardware: {hardware}\n"
    text = text.replace("../search_spaces/", f"{ROOT}/search_spaces/").replace(
        "tiny-llama.json", f"{ROOT}/experiments/tiny-llama.json"
    )
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return load_experiment(path)


def test_default_hardware_is_auto_float32(tmp_path):
    exp = _experiment(tmp_path, "{}")
    assert (exp.hardware.device, exp.hardware.dtype, exp.hardware.gpus_per_worker) == ("auto", "float32", 1.0)


def test_ray_asks_for_gpus_when_the_experiment_may_use_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the driver's own GPU plays no part
    auto = _experiment(tmp_path, "{device: auto, gpus_per_worker: 0.25}")
    assert _resources(auto, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0}
    assert _resources(auto, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 0.25}  # four workers share one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only head
    cuda = _experiment(tmp_path, "{device: cuda}")
    assert _resources(cuda, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 1.0}  # an autoscaler adds GPU nodes
    cpu = _experiment(tmp_path, "{device: cpu}")
    assert _resources(cpu, cluster_gpus=2) == {"num_cpus": 1, "num_gpus": 0}


def test_bad_hardware_is_refused_with_its_field(tmp_path):
    with pytest.raises(AutosquashError, match="hardware.device"):
        _experiment(tmp_path, "{device: tpu}")
    with pytest.raises(AutosquashError, match="gpus_per_worker"):
        _experiment(tmp_path, "{gpus_per_worker: 0}")


def test_cuda_without_a_gpu_fails_before_the_search_writes_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = _experiment(tmp_path, "{device: cuda}")
    out = tmp_path / "run"
    with pytest.raises(AutosquashError, match="no CUDA GPU"):
        run_search(exp, SearchOptions(out_dir=out, trials=1, workers=1))
    assert not out.exists()


def test_default_variant_cache_leaves_room_for_the_model(monkeypatch, tiny_model):
    """The default cache shrinks as the model grows: 1B-class weights on a 24 GB machine leave it little."""
    import torch

    from autosquash.search import trial

    monkeypatch.setattr(trial, "host_memory_bytes", lambda: 24 << 30)
    assert trial.default_cache_bytes(tiny_model, workers=2) == (24 << 30) // 2 // 4  # a small model: a quarter
    one_b = torch.nn.Linear(1000, 1_000_000, bias=False, device="meta")  # 1e9 weights, 4 GB in float32
    assert trial.default_cache_bytes(one_b, workers=1) == int((12 << 30) - 2.5 * 4e9)  # what half leaves
    assert trial.default_cache_bytes(one_b, workers=2) == 256 << 20  # nothing left: the floor
