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
def _feed_inputs(model: torch.nn.Module, batch: torch.Tensor, paths: list[str], sink) -> None:
    """Run `batch` through `model`, one sequence at a time, handing `sink(path, x)` the (tokens, in)
    activations that enter each module in `paths`."""
    hooks = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda _m, args, p=p: sink(p, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        )
        for p in paths
    ]
    try:
        device = next(model.parameters()).device
        for row in batch:
            model(row.unsqueeze(0).to(device))
    finally:
        for h in hooks:
            h.remove()


def collect_stats(model: torch.nn.Module, batch: torch.Tensor) -> Stats:
    """E[x²] per input channel of each linear inside the decoder blocks, over all tokens of `batch`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(path: str, x: torch.Tensor) -> None:
        sums[path] = sums.get(path, 0) + (x * x).sum(0)
        counts[path] = counts.get(path, 0) + x.shape[0]

    paths = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    _feed_inputs(model, batch, paths, add)
    # On the CPU, where the operators read them, whatever device the model ran on.
    return {k: (sums[k] / counts[k]).to("cpu", torch.float32).contiguous() for k in sums}


def collect_inputs(model: torch.nn.Module, batch: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """The (tokens, in_features) activations entering each module in `paths` over `batch` (for benchmarks)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    _feed_inputs(model, batch, paths, lambda p, x: seen[p].append(x))
    return {p: torch.cat(xs).cpu() for p, xs in seen.items()}


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
