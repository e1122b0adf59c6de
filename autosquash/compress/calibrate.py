"""Calibration statistics: per input channel, the mean squared activation entering every linear layer;
on request the full covariance E[x xᵀ] of those activations (error compensation weighs by it).

Computed once per (model, calibration data) and cached on disk as safetensors (never pickle).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Stats = dict[str, torch.Tensor]  # module path (e.g. "model.layers.3.mlp.down_proj") -> (in_features,)


@torch.no_grad()
def _feed_inputs(model: torch.nn.Module, batch: torch.Tensor, paths: list[str], sink, raw: bool = False) -> None:
    """Run `batch` through `model`, one sequence at a time, handing `sink(path, x)` the (tokens, in)
    activations that enter each module in `paths` (with `raw`, the module's own input tensor instead)."""

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x if raw else x.detach().reshape(-1, x.shape[-1]).float()

    hooks = [
        model.get_submodule(p).register_forward_pre_hook(lambda _m, args, p=p: sink(p, rows(args[0]))) for p in paths
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

    _feed_inputs(model, batch, block_linears(model), add)
    # On the CPU, where the operators read them, whatever device the model ran on.
    return {k: (sums[k] / counts[k]).to("cpu", torch.float32).contiguous() for k in sums}


def block_linears(model: torch.nn.Module) -> list[str]:
    """Module paths of the linears inside the decoder blocks."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def collect_covariances(
    model: torch.nn.Module, batch: torch.Tensor, paths: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (in, in) of the activations entering each linear in `paths` (by default every block linear)
    over all tokens of `batch`, float32 in host memory.

    Linears fed the very same activations (a block's q/k/v, its gate/up) share one matrix, held once: for
    SmolLM2-135M that is 4 matrices per block (3 of 576², 1 of 1536²), 0.4 GB in all.
    """
    paths = block_linears(model) if paths is None else paths
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}
    last: list = [None, None]  # the input last seen (kept alive, so identity is meaningful) and its owner

    def add(path: str, x: torch.Tensor) -> None:
        shared = last[0] is x
        mine = last[1] if shared else path
        if owner.setdefault(path, mine) != mine:
            raise RuntimeError(f"{path} shares its input with another linear in one pass and not in another")
        if shared:
            return
        last[0], last[1] = x, path
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if path not in sums:
            sums[path] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
            counts[path] = 0
        sums[path].addmm_(rows.T, rows)
        counts[path] += rows.shape[0]

    _feed_inputs(model, batch, paths, add, raw=True)
    last[0] = None
    unique = {p: (sums[p] / counts[p]).cpu() for p in sums}
    return {p: unique[owner[p]] for p in paths if p in owner}


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
