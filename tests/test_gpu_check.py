"""benchmarks/gpu_check.sh's dry mode: the GPU check's steps CPU-sized (a tiny random model, one trial each), so
that the script a GPU machine runs cannot rot while no GPU is lent."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.integration  # two whole searches: about 45 s on 2 idle cores


def test_the_dry_gpu_check_writes_its_tables(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry"], env=env, capture_output=True, text=True, timeout=600
    )
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{summary}"
    assert "scale: done" in summary and "search: done" in summary and "mode dry" in summary
    (row,) = json.loads((out / "scale.json").read_text())
    assert (row["size"], row["device"], row["trials"]) == ("tiny", "cpu", 1)
    with (out / "search-trials.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["COMPLETE"]
    assert (out / "search-pareto.csv").is_file() and (out / "scale.txt").is_file()
    assert len(list(out.iterdir())) <= 8  # the most files the device tool brings back from $OUT


def test_the_gpu_check_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert "sees no CUDA GPU here" in run.stdout and "Traceback" not in run.stdout + run.stderr
