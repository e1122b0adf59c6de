"""Compressed tensors on disk: the variant cache's second tier, shared by every worker of a machine.

A search makes each (layer, deployed tensors) variant once, wherever it ran first: the workers of one
machine read what another made, a resumed search reads what the first run made, and an export reads the
very bytes its trial was scored with. Files are numpy archives (no pickle) written to a temporary name and
renamed, so a reader sees a whole file or none; one that fails to read is taken as absent and made again.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from autosquash.compress.operators.base import Variant
from autosquash.files import atomic_path, content_key
from autosquash.formats.codecs import QuantizedTensor


def scope_digest(model_key: str, seed: int, dtype: str, stats: dict[str, torch.Tensor]) -> str:
    """What the variants of a search depend on besides their keys: the base model (and its seed, for random
    weights), the dtype it is held in and the calibration statistics."""
    parts = [
        (name, stats[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()) for name in sorted(stats)
    ]
    return content_key(f"{model_key}|{seed}|{dtype}", *(p for pair in parts for p in pair))


def _encode(value, arrays: list[np.ndarray]):
    """A JSON-able description of `value`, its arrays appended to `arrays`."""
    if value is None:
        return None
    if isinstance(value, QuantizedTensor):
        arrays.append(value.data)
        return {"q": value.type, "shape": list(value.shape), "a": len(arrays) - 1}
    if isinstance(value, torch.Tensor):
        arrays.append(value.detach().cpu().numpy())
        return {"t": len(arrays) - 1}
    if isinstance(value, Variant):
        return {"form": value.form, "parts": {k: _encode(v, arrays) for k, v in value.parts.items()}}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, arrays) for k, v in value.items()}}
    if isinstance(value, tuple | list):
        return {"seq": [_encode(v, arrays) for v in value]}
    raise TypeError(f"a variant store cannot hold {type(value).__name__}")


def _decode(desc, arrays):
    if desc is None:
        return None
    if "q" in desc:
        return QuantizedTensor(desc["q"], tuple(desc["shape"]), arrays[f"a{desc['a']}"])
    if "t" in desc:
        return torch.from_numpy(arrays[f"a{desc['t']}"])
    if "form" in desc:
        return Variant(desc["form"], {k: _decode(v, arrays) for k, v in desc["parts"].items()})
    if "dict" in desc:
        return {k: _decode(v, arrays) for k, v in desc["dict"].items()}
    return tuple(_decode(v, arrays) for v in desc["seq"])


class VariantStore:
    """Variants by key in one folder, up to `max_bytes` of files (beyond it, new variants are not kept)."""

    def __init__(self, folder: Path | str, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._bytes = self._scan()

    def _scan(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.folder) if e.name.endswith(".npz"))

    @property
    def nbytes(self) -> int:
        """Bytes of variant files in the folder, as last counted."""
        return self._bytes

    def _path(self, key: tuple) -> Path:
        return self.folder / f"{content_key(repr(key), length=32)}.npz"

    def load(self, key: tuple):
        """The stored value of `key`, or None."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(arrays.pop("meta").tobytes())
            if meta["key"] != repr(key):
                return None  # a hash collision: made again, never mixed up
            return _decode(meta["value"], arrays)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # unreadable (a disk that filled, a hand edit): made again
            return None

    def save(self, key: tuple, value) -> bool:
        """Keep `value` under `key` unless the folder is full; whether it was kept."""
        arrays: list[np.ndarray] = []
        meta = {"key": repr(key), "value": _encode(value, arrays)}
        size = sum(a.nbytes for a in arrays)
        if self._bytes + size > self.max_bytes:
            self._bytes = self._scan()  # other workers write here too
            if self._bytes + size > self.max_bytes:
                return False
        path = self._path(key)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                **{f"a{i}": a for i, a in enumerate(arrays)},
            )
        self._bytes += path.stat().st_size
        return True
