"""Files are written whole: a failure mid-write (an error, a full disk) leaves the old file, or none."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autosquash.files import atomic_path, write_text
from autosquash.formats.gguf import gguf_writer


def _gguf(path: Path, values: float, fail: bool = False) -> None:
    with gguf_writer(path, "llama") as w:
        w.add_tensor("t", np.full((4, 32), values, dtype=np.float32))
        if fail:
            raise RuntimeError("stopped mid-write")


def test_a_failed_gguf_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.gguf"
    _gguf(path, 1.0)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        _gguf(path, 2.0, fail=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(RuntimeError):
        _gguf(tmp_path / "new.gguf", 2.0, fail=True)
    assert not (tmp_path / "new.gguf").exists()


def test_text_is_replaced_whole(tmp_path):
    path = tmp_path / "plan.yaml"
    write_text(path, "a: 1\n")
    with pytest.raises(KeyError), atomic_path(path) as tmp:
        tmp.write_text("a: half")
        raise KeyError("crash")
    assert path.read_text() == "a: 1\n" and len(list(tmp_path.iterdir())) == 1


# A write that hits a file-size limit (the disk full) fails with EFBIG; the old file must survive it.
FULL_DISK = """
import resource, signal, sys, torch
from autosquash.formats.torch_file import write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write(sys.argv[1], {"w": torch.zeros(64, 1024)}, {"base_model": "x"})
except Exception as e:
    print("failed:", e)
"""


def test_a_full_disk_mid_write_leaves_the_old_file(tmp_path):
    from autosquash.formats.torch_file import write

    path = tmp_path / "m.safetensors"
    import torch

    write(path, {"w": torch.ones(2, 2)}, {"base_model": "x"})
    before = path.read_bytes()
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, timeout=120)
    assert "failed: cannot write" in out.stdout and "File too large" in out.stdout, out.stdout + out.stderr
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


FULL_DISK_EXPORT = """
import resource, signal, sys
from autosquash.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
sys.exit(main(["export", "--model", sys.argv[1], "--uniform", "Q8_0", "--out", sys.argv[2]]))
"""


def test_export_onto_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, tmp_path_factory):
    tiny = str(Path(__file__).parents[1] / "experiments/tiny-llama.json")
    out = tmp_path / "m.gguf"
    # An empty cache: the disk fills while the converted tokenizer and the calibration statistics are kept too.
    env = {**os.environ, "AUTOSQUASH_CACHE_DIR": str(tmp_path_factory.mktemp("empty-cache"))}
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK_EXPORT, tiny, str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("autosquash: error:") and "Traceback" not in run.stderr
    assert "File too large" in run.stderr and list(tmp_path.iterdir()) == []


def test_written_files_have_the_modes_a_plain_write_gives(tmp_path):

    import torch

    from autosquash.formats.torch_file import write

    write(tmp_path / "m.safetensors", {"w": torch.ones(2, 2)}, {"base_model": "x"})
    _gguf(tmp_path / "m.gguf", 1.0)
    (tmp_path / "plain").write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' own temporary files are 0600
    assert modes["plain"] == 0o666 & ~_umask_now()


def _umask_now() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
