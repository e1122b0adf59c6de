"""Calibration statistics: per input channel, the mean squared activation entering every linear layer.

Computed once per (model, calibration data) and cached on disk as safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Stats = dict[str, torch.Tensor]  # module path (e.g. "model.layers.3.mlp.down_proj") -> (in_features,)


@torch.no_grad()
def collect_stats(model: torch.nn.Module, batch: torch.Tensor) -> Stats:
    """E[x²] per input channel of each linear inside the decoder blocks, over all tokens of `batch`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        for row in batch:
            model(row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).contiguous() for k in sums}


@torch.no_grad()
def collect_inputs(model: torch.nn.Module, batch: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """The (tokens, in_features) activations entering each module in `paths` over `batch` (for benchmarks)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda _m, args, p=p: seen[p].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for p in paths
    ]
    try:
        for row in batch:
            model(row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(xs) for p, xs in seen.items()}


def cached_stats(model: torch.nn.Module, batch: torch.Tensor, model_key: str, cache_dir: Path) -> Stats:
    """`collect_stats`, read from `cache_dir` when this model and batch were seen before."""
    digest = hashlib.sha256(model_key.encode() + batch.numpy().tobytes()).hexdigest()[:24]
    path = Path(cache_dir) / f"calib-{digest}.safetensors"
    if path.exists():
        return load_file(str(path))
    stats = collect_stats(model, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(stats, str(tmp))
    tmp.replace(path)
    return stats
