"""Writing files whole: a crash, a full disk or a stop mid-write leaves the old file or none, never half of one;
and the one way autosquash's disk caches name their entries (a hash of what the entry depends on) and write them
(whole, a file or a folder, the first of two racing writers kept)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from autosquash.errors import AutosquashError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to: renamed over `path` when the block ends, removed when it
    raises. Same folder, so the rename is atomic; created as any file is (the process's umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() makes it, whatever the writer's own temporary mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def content_key(*parts: str | bytes, length: int = 24) -> str:
    """A cache entry's name: the first `length` hex digits of the SHA-256 of `parts` in order (strings as UTF-8),
    everything the entry depends on."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to fill: renamed to `path` when the block ends (where another
    process renamed its own copy first, that one is kept and this one dropped), removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():  # not another writer's copy in place: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """`path` replaced by `text`, whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def cache_dir() -> Path:
    """autosquash's cache folder: `$AUTOSQUASH_CACHE_DIR`, else ~/.cache/autosquash."""
    return Path(os.environ.get("AUTOSQUASH_CACHE_DIR") or Path.home() / ".cache" / "autosquash")


def check_creatable(folder: Path, where: str) -> None:
    """Refuse in one line (starting with `where`) a folder that could not be made or written: a file where it or a
    parent must be, or a nearest existing parent this user may not write. Makes nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AutosquashError(f"{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AutosquashError(f"{where}: {existing} is not writable")
