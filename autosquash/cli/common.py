"""What every subcommand shares: the cache folder, writable paths checked before work starts, JSON printed finite, a
store's refusal in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

from autosquash.errors import AutosquashError
from autosquash.files import cache_dir, check_creatable

CACHE_DIR = cache_dir()


def finite(obj):
    """`obj` with each NaN or infinite float as None (JSON has neither), and the paths of those replaced."""
    bad: list[str] = []

    def walk(x, path: str):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(path or "value")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, ""), bad


def writable_folder(folder: Path, what: str, create: bool = True) -> Path:
    """`folder`, created if missing (or, with create=False, creatable: its nearest existing parent writable);
    refused in one line when it, or a parent, is a file or cannot be written to."""
    check_creatable(folder, f"{what} {folder}")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AutosquashError(f"{what} {folder}: cannot create it ({e.strerror or e})") from None
    return folder


def writable_file(path: Path, what: str) -> Path:
    """`path` as a file to write: its folder made writable (see writable_folder), the path not a folder."""
    if path.is_dir():
        raise AutosquashError(f"{what} {path}: is a folder; name the file to write")
    writable_folder(path.parent, what.split()[0] + " folder of")
    return path


def print_json(obj, indent: int | None = None) -> None:
    """Print `obj` as valid JSON (non-finite numbers as null); then, if there were any, fail naming them."""
    print(json.dumps(finite(obj)[0], indent=indent, allow_nan=False))
    check_finite(obj)


def store_error(e) -> str:
    """One line for a database error of Optuna's or MLflow's store (a lock another process holds, above all):
    the database's own words, from the deepest cause (Optuna and MLflow wrap SQLAlchemy's error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    why = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    if "locked" in why:
        return (
            f"a search database is locked by another process ({why}); finished trials are stored: "
            "continue with --resume once the other process lets go"
        )
    if "readonly" in why or "read-only" in why:
        return f"a search database is read-only ({why}): give a store this user may write, or another --out"
    if "disk" in why or "full" in why:
        return f"a search database could not be written ({why}): is the disk full? Finished trials are stored"
    return f"a search database failed ({why[:200]})"


def check_finite(obj) -> None:
    """Fail with the names of any non-finite numbers in `obj`."""
    _, bad = finite(obj)
    if bad:
        raise AutosquashError(f"not a finite number: {', '.join(bad)} (NaN or infinite weights?)")
