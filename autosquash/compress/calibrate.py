"""Calibration statistics: per input channel, the mean squared activation entering every linear layer (the
decoder blocks' and the output head's), and the full covariance E[x xᵀ] of the output head's input; for error
compensation also that of the block linears' inputs.

Computed once per (model, calibration data) and cached on disk as safetensors (never pickle).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autosquash.files import atomic_folder, atomic_path, content_key

# Bytes of covariance matrices one pass over the calibration tokens gathers: a model whose matrices need
# more is measured in several passes, a group of blocks at a time, each pass stopping after its group.
COVARIANCE_PASS_BYTES = 1 << 30


# Bump when what collect_stats gathers changes, so cached statistics are gathered again.
STATS_VERSION = 3  # 2: the output head's input (HEAD) too; 3: its covariance (HEAD_COVARIANCE)

# The output head's module path (a tied head shares the token table's weight, and its input is what
# weighs the table's quantization error, as llama.cpp's importance matrix weighs token_embd).
HEAD = "lm_head"
# E[h hᵀ] (hidden, hidden) of the output head's input: the token table the head reads is quantized with
# its error spread through it (compress.gptq), which the head's output error is measured by.
HEAD_COVARIANCE = "lm_head:covariance"


class Stats(dict[str, torch.Tensor]):
    """E[x²] per input channel, (in_features,), by module path (e.g. "model.layers.3.mlp.down_proj"; HEAD
    for the output head's input, the final norm's output); and HEAD_COVARIANCE, that input's E[x xᵀ].

    `compensation`, when set, says the block linears are quantized with error compensation: it travels with
    the statistics to every trial, export and worker that builds variants from them.
    """

    compensation: Compensation | None = None


def compensation_of(stats: dict) -> Compensation | None:
    """The error compensation statistics carry (None for plain ones, or a plain dict)."""
    return getattr(stats, "compensation", None)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the modules of interest have run."""


@torch.no_grad()
def _feed_inputs(
    model: torch.nn.Module,
    batch: torch.Tensor,
    paths: list[str],
    sink,
    raw: bool = False,
    stop_after: str | None = None,
) -> None:
    """Run `batch` through `model`, one sequence at a time, handing `sink(path, x)` the (tokens, in)
    activations that enter each module in `paths` (with `raw`, the module's own input tensor instead);
    with `stop_after` (a module path), each pass ends once that module has run."""

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x if raw else x.detach().reshape(-1, x.shape[-1]).float()

    def stop(*_) -> None:
        raise _Stop

    hooks = [
        model.get_submodule(p).register_forward_pre_hook(lambda _m, args, p=p: sink(p, rows(args[0]))) for p in paths
    ]
    if stop_after is not None:
        hooks.append(model.get_submodule(stop_after).register_forward_hook(stop))
    try:
        device = next(model.parameters()).device
        for row in batch:
            try:
                model(row.unsqueeze(0).to(device))
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()


def collect_stats(model: torch.nn.Module, batch: torch.Tensor) -> Stats:
    """E[x²] per input channel of each linear inside the decoder blocks and of the output head (HEAD),
    and E[x xᵀ] of the head's input (HEAD_COVARIANCE), over all tokens of `batch`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(path: str, x: torch.Tensor) -> None:
        sums[path] = sums.get(path, 0) + (x * x).sum(0)
        counts[path] = counts.get(path, 0) + x.shape[0]
        if path == HEAD:
            x = x.double()  # a sum over many tokens of products that differ by orders of magnitude
            sums[HEAD_COVARIANCE] = sums.get(HEAD_COVARIANCE, 0) + x.T @ x
            counts[HEAD_COVARIANCE] = counts[path]

    head = [HEAD] if isinstance(getattr(model, HEAD, None), torch.nn.Linear) else []
    _feed_inputs(model, batch, block_linears(model) + head, add)
    # On the CPU, where the operators read them, whatever device the model ran on.
    return Stats({k: (sums[k] / counts[k]).to("cpu", torch.float32).contiguous() for k in sums})


def block_linears(model: torch.nn.Module) -> list[str]:
    """Module paths of the linears inside the decoder blocks."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def collect_covariances(
    model: torch.nn.Module,
    batch: torch.Tensor,
    paths: list[str] | None = None,
    stop_after: str | None = None,
    token_normalized: bool = False,
) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (in, in) of the activations entering each linear in `paths` (by default every block linear)
    over all tokens of `batch`, float32 in host memory (each pass ends after module `stop_after`, if given).

    With `token_normalized`, each token's x counts scaled to unit mean square, E[x xᵀ / mean(x²)]: every
    token weighs the same. A transformer's first token (an attention sink) can enter a linear with 40x the
    others' norm, 1600x their energy, and then outweighs all of a sequence's other tokens together.

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
        if token_normalized:
            rows = rows / rows.square().mean(1, keepdim=True).sqrt().clamp_min(1e-30)
        if path not in sums:
            sums[path] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
            counts[path] = 0
        sums[path].addmm_(rows.T, rows)
        counts[path] += rows.shape[0]

    _feed_inputs(model, batch, paths, add, raw=True, stop_after=stop_after)
    last[0] = None
    unique = {p: sums.pop(p).div_(counts[p]).cpu() for p in list(sums)}
    return {p: unique[owner[p]] for p in paths if p in owner}


def collect_inputs(model: torch.nn.Module, batch: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """The (tokens, in_features) activations entering each module in `paths` over `batch` (for benchmarks)."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    _feed_inputs(model, batch, paths, lambda p, x: seen[p].append(x))
    return {p: torch.cat(xs).cpu() for p, xs in seen.items()}


def cached_stats(model: torch.nn.Module, batch: torch.Tensor, model_key: str, cache_dir: Path) -> Stats:
    """`collect_stats`, read from `cache_dir` when this model and batch were seen before."""
    path = Path(cache_dir) / f"calib-{content_key(f'{model_key}|{STATS_VERSION}', batch.numpy().tobytes())}.safetensors"
    if path.exists():
        return Stats(load_file(str(path)))
    stats = collect_stats(model, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(stats, str(tmp))
    return stats


class Covariances:
    """E[x xᵀ] of the inputs of each block linear, kept on disk (safetensors shards in one folder, an index
    naming each linear's matrix) and read one matrix at a time: whoever builds a variant reads its own.

    Pickled (to Ray workers, on any node) they travel as numpy arrays, which the object store keeps once per
    node; a worker reads them from there, read-only.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder).resolve()
        self.index: dict[str, list[str]] = json.loads((self.folder / "index.json").read_text())
        self.digest = self.folder.name  # names the model and tokens they were measured on
        self.arrays: dict[str, np.ndarray] | None = None  # by "shard/key", once shipped

    def __contains__(self, path: str) -> bool:
        return path in self.index

    def get(self, path: str) -> torch.Tensor | None:
        """The (in, in) matrix of linear `path` (float32, host memory), or None if it has none."""
        if path not in self.index:
            return None
        shard, key = self.index[path]
        if self.arrays is not None:
            with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes into them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(self.arrays[f"{shard}/{key}"])
        return self._read(shard, key)

    def __reduce__(self):
        arrays = self.arrays
        if arrays is None:
            arrays = {}
            for shard, key in self.index.values():
                if f"{shard}/{key}" not in arrays:
                    arrays[f"{shard}/{key}"] = self._read(shard, key).numpy()
        return (_shipped_covariances, (str(self.folder), self.index, arrays))

    def _read(self, shard: str, key: str) -> torch.Tensor:
        with safe_open(str(self.folder / shard), framework="pt") as f:
            return f.get_tensor(key)


def _shipped_covariances(folder: str, index: dict[str, list[str]], arrays: dict[str, np.ndarray]) -> Covariances:
    c = Covariances.__new__(Covariances)
    c.folder, c.index, c.digest, c.arrays = Path(folder), index, Path(folder).name, arrays
    return c


def _block_groups(model: torch.nn.Module, max_bytes: int) -> list[tuple[str, list[str]]]:
    """The block linears in consecutive groups of whole blocks whose matrices (counted unshared) fit
    `max_bytes`, one block at least; each with the path of its last block."""
    by_block: dict[str, list[str]] = {}
    for path in block_linears(model):
        head, rest = path.split(".layers.", 1)
        by_block.setdefault(f"{head}.layers.{rest.split('.')[0]}", []).append(path)
    groups: list[tuple[str, list[str]]] = []
    size = 0
    for block, paths in by_block.items():
        need = sum(model.get_submodule(p).in_features ** 2 * 4 for p in paths)
        if not groups or size + need > max_bytes:
            groups.append((block, []))
            size = 0
        groups[-1] = (block, groups[-1][1] + paths)
        size += need
    return groups


def cached_covariances(
    model: torch.nn.Module,
    batch: torch.Tensor,
    model_key: str,
    cache_dir: Path,
    pass_bytes: int = COVARIANCE_PASS_BYTES,
    token_normalized: bool = False,
) -> Covariances:
    """`collect_covariances` of every block linear, on disk under `cache_dir` (read back when this model and
    batch were seen before). At most about `pass_bytes` of matrices are held at once: a group of blocks per
    pass over `batch`, each pass ending after its last block, its matrices written before the next."""
    kind = "covariances-normalized|" if token_normalized else "covariances|"
    folder = Path(cache_dir) / f"cov-{content_key(kind, model_key, batch.numpy().tobytes())}"
    if (folder / "index.json").exists():
        return Covariances(folder)
    with atomic_folder(folder) as tmp:  # another process's copy, renamed first, is kept
        index: dict[str, list[str]] = {}
        for k, (last_block, paths) in enumerate(_block_groups(model, pass_bytes)):
            shard = f"shard-{k}.safetensors"
            matrices = collect_covariances(
                model, batch, paths, stop_after=last_block, token_normalized=token_normalized
            )
            held: dict[int, str] = {}  # one entry per shared matrix, under the first linear that reads it
            for path, m in matrices.items():
                index[path] = [shard, held.setdefault(id(m), path)]
            save_file({key: matrices[key].contiguous() for key in held.values()}, str(tmp / shard))
            del matrices
        (tmp / "index.json").write_text(json.dumps(index))
    return Covariances(folder)


@dataclass(frozen=True)
class Compensation:
    """Error compensation of the quantized block linears (GPTQ, autosquash.compress.gptq): each linear's
    quantization error spread through its inputs' covariance, dampened by `damp` of its mean diagonal."""

    covariances: Covariances
    damp: float
    method: str = "gptq"

    @property
    def key(self) -> tuple:
        """What a compensated variant depends on beyond the plain one's key."""
        return (self.method, self.damp, self.covariances.digest)

    def hessian(self, path: str, cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """The covariance of linear `path`'s inputs, on the input columns `cols` pruning keeps (None: all)."""
        h = self.covariances.get(path)
        if h is None or cols is None:
            return h
        return h[cols][:, cols]
