"""Faults a search survives: a trial that fails is recorded with its reason; a killed worker is retried."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import LlamaForCausalLM

from autosquash.cli import main
from autosquash.models.load import load_model, load_tokenizer
from autosquash.track.mlflow_store import default_tracking_uri
from tests.conftest import SMALL_SPACE as SMALL
from tests.conftest import write_experiment

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration


def _rows(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def _measured(rows: list[dict]) -> list[tuple]:
    """What each trial measured (a search fills in the test-split columns of its front at its end)."""
    return [(r["trial"], r["state"], r["perplexity"], r["kl"], r["memory_mb"], r["plan"]) for r in rows]


def _small_search(tmp_path: Path, trials: int, *args: str) -> tuple[Path, Path, subprocess.Popen]:
    """(experiment, out folder, the running driver) of a search of SMALL on the tiny Llama."""
    exp = write_experiment(tmp_path, str(ROOT / "experiments/tiny-llama.json"), SMALL, trials)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autosquash", "search", str(exp), "--out", str(out), *args]
    return exp, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials_stored(out: Path, proc: subprocess.Popen, before: int) -> None:
    """Wait (up to 3 minutes, while the driver runs) until the search in `out` has stored more than `before`
    trials."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "trials.csv").exists() and len(_rows(out)) > before:
            return
        time.sleep(0.1)


def test_failing_trial_is_recorded_with_its_reason(tmp_path):
    # Weights above F16's range (65504): an F16 plan overflows to inf and its perplexity is not finite.
    model: LlamaForCausalLM = load_model(str(ROOT / "experiments/tiny-llama.json"))
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(1e6)
    model.save_pretrained(tmp_path / "huge")
    load_tokenizer("smollm2-135m").save_pretrained(tmp_path / "huge")
    space = {
        "name": "overflow",
        "target": "torch",
        "attn": {"quant": ["Q8_0", "F16"]},
        "ffn": {"quant": ["Q8_0", "F16"]},
        "baselines": ["F16", "Q8_0"],
    }
    out = tmp_path / "out"
    assert main(["search", str(write_experiment(tmp_path, str(tmp_path / "huge"), space, 2)), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]  # the F16 baseline fails, Q8_0 does not
    assert "not finite" in rows[0]["error"]
    client = MlflowClient(default_tracking_uri(out))
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id], "tags.`autosquash.trial` = '0'")
    assert runs[0].info.status == "FAILED" and "not finite" in runs[0].data.tags["autosquash.error"]
    front = list(csv.DictReader((out / "pareto.csv").open()))
    assert [r["trial"] for r in front] == ["1"]  # a failed trial never reaches the front


def _lock(db: Path):
    """An exclusive lock on an SQLite file, held as another writer (a second search, a tool) would hold it."""
    import sqlite3

    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_a_locked_store_is_waited_out_a_killed_worker_retried_and_a_lock_past_the_wait_or_a_full_disk_named(
    tmp_path, monkeypatch, capsys
):
    """One search meets two faults: its store locked by another process for longer than SQLite's own wait (it
    waits and goes on), then its worker killed mid-trial (the trial is retried); it finishes every trial. A
    lock held past the store's wait is then named in one line, nothing changed. A resumed search whose disk
    fills (every write of the driver fails once a trial is stored: a file-size limit of one byte, set on the
    running driver) stops with one line, no traceback; --resume on a disk with room finishes the asked trials,
    every stored one kept, none evaluated twice."""
    exp, out, proc = _small_search(tmp_path, 4)
    _trials_stored(out, proc, 0)
    # Longer than SQLite's own 5 s wait, shorter than the store's: the search waits and goes on.
    conn = _lock(out / "optuna.db")
    time.sleep(8)
    conn.rollback()
    conn.close()
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for p in psutil.process_iter(["cmdline"]):
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::run_trial"):
                p.kill()  # mid-trial: the task is lost with its worker process
                killed = p.pid
                break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=300)
    assert killed is not None, "no worker was seen running a trial after the lock"
    assert proc.returncode == 0, output[-2000:]
    rows = _rows(out)
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)

    # A lock held past the wait: one line naming it, nothing changed.
    from autosquash.search import preflight

    with monkeypatch.context() as m:
        m.setattr(preflight, "STORE_TIMEOUT_S", 0.5)
        conn = _lock(out / "optuna.db")
        try:
            assert main(["search", str(exp), "--out", str(out), "--resume", "--trials", "5"]) == 1
        finally:
            conn.rollback()
            conn.close()
    err = capsys.readouterr().err
    assert "database is locked by another process" in err and err.count("\n") == 1, err
    assert _rows(out) == rows

    # The disk fills once the resumed search has stored a trial.
    cmd = [sys.executable, "-m", "autosquash", "search", str(exp), "--out", str(out), "--resume", "--trials", "7"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _trials_stored(out, proc, len(rows))
    assert proc.poll() is None, "the search ended before the disk filled"
    psutil.Process(proc.pid).rlimit(psutil.RLIMIT_FSIZE, (1, 1))
    output, _ = proc.communicate(timeout=300)
    last = output.strip().splitlines()[-1]
    assert proc.returncode not in (0, None) and "Traceback" not in output, output[-3000:]
    # Whichever write failed first (a table: the system's words; a database: SQLite's) is named in one line.
    assert last.startswith("autosquash: error:") and ("File too large" in last or "is the disk full" in last), last
    stored = _measured(_rows(out))
    assert stored[:4] == _measured(rows)
    assert main(["search", str(exp), "--out", str(out), "--resume", "--trials", "7"]) == 0
    after = _rows(out)
    assert len(after) == 7 and all(r["state"] == "COMPLETE" for r in after)
    assert _measured(after)[: len(stored)] == stored  # what was stored before the disk filled is kept as it was
    assert len({(out / r["plan"]).read_text() for r in after}) == 7  # no plan evaluated twice
