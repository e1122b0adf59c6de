"""autosquash's torch format: one safetensors file (no pickle) of named tensors, each compressed one kept as
its raw GGUF blocks (uint8 rows) with its type and shape, and string metadata.

The file is thus the size the cost model prices, and decodes through the dequantizer trials use to the very
float weights a trial evaluated. What the tensors mean (a plan's linears, factors, adapter) is the business
of autosquash.export.torch_file; this module is only the container.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autosquash.errors import AutosquashError
from autosquash.files import atomic_path
from autosquash.formats.codecs import QuantizedTensor, dequantize

FORMAT = "autosquash-torch"
VERSION = "1"


def write(path: str | Path, tensors: dict[str, QuantizedTensor | torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write `tensors` (GGUF blocks or plain tensors) and `metadata` to `path`; returns the count per type."""
    from safetensors.torch import save_file

    raw, types = {}, {}
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            raw[name] = torch.from_numpy(t.data.copy())
            types[name] = [t.type, *t.shape]
        else:
            raw[name] = t.detach().to("cpu").contiguous().clone()
    meta = {**metadata, "format": FORMAT, "format_version": VERSION, "types": json.dumps(types)}
    with atomic_path(path) as tmp:
        try:
            save_file(raw, str(tmp), metadata=meta)
        except Exception as e:  # safetensors reports a full disk as its own error type
            raise AutosquashError(f"cannot write {path}: {e}") from None
    counts: dict[str, int] = {}
    for name, t in raw.items():
        kind = types[name][0] if name in types else str(t.dtype).removeprefix("torch.")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a torch-format file; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise AutosquashError(f"model file {p} does not exist")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AutosquashError(
            f"{p} is not an autosquash torch-format file (safetensors): {str(e).splitlines()[0]}"
        ) from None
    if meta.get("format") != FORMAT:
        raise AutosquashError(f"{p} is a safetensors file but not autosquash's torch format (export --format torch)")
    if meta.get("format_version") != VERSION:
        raise AutosquashError(
            f"{p} is torch format version {meta.get('format_version')}; this autosquash reads {VERSION}"
        )
    return meta


def read_config(meta: dict[str, str]):
    """The base model's transformers config recorded in a torch-format file's metadata."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(meta["config"]))


class Stored:
    """A torch-format file's tensors, decoded on request: GGUF blocks through the dequantizer, the rest as is."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = path
        self.metadata = read_metadata(path)
        self.types: dict[str, list] = json.loads(self.metadata["types"])
        with safe_open(str(path), "pt") as f:
            self.raw = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.raw:
            raise AutosquashError(f"{self.path}: tensor {name} is missing")
        if name not in self.types:
            return self.raw[name]
        qtype, rows, cols = self.types[name]
        return dequantize(QuantizedTensor(qtype, (rows, cols), self.raw[name].numpy()))
