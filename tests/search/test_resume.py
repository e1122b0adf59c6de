"""A stopped search resumes from its storage: no finished trial lost, none logged twice."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autosquash.cli import main
from autosquash.track.mlflow_store import default_tracking_uri

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def smoke(smoke_plain) -> str:
    return smoke_plain


def _trials(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def _trial_runs(out: Path) -> list[int]:
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`autosquash.role` = 'trial'")
    parents = client.search_runs([exp.experiment_id], "tags.`autosquash.role` = 'search'")
    assert len(parents) == 1  # a resumed search reopens its parent run
    return sorted(int(r.data.tags["autosquash.trial"]) for r in runs)


def test_resume_of_a_folder_without_a_search_is_refused(smoke, tmp_path, capsys):
    assert main(["search", smoke, "--trials", "3", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no search to continue" in capsys.readouterr().err
    assert not (tmp_path / "none" / "optuna.db").exists()


def test_driver_killed_mid_search_resumes_without_loss(smoke, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "autosquash", "search", smoke, "--trials", "4", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (out / "trials.csv").exists() and len(_trials(out)) >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the search finished no two trials in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done_before = {r["trial"]: r["perplexity"] for r in _trials(out)}
    assert main(["search", smoke, "--trials", "4", "--workers", "1", "--out", str(out), "--resume"]) == 0
    rows = [r for r in _trials(out) if r["state"] == "COMPLETE"]
    assert len(rows) == 4
    after = {r["trial"]: r["perplexity"] for r in rows}
    assert all(after[t] == p for t, p in done_before.items())  # nothing finished was lost or redone
    numbers = _trial_runs(out)
    assert len(numbers) == len(set(numbers))  # no trial logged twice
    assert set(after) <= {str(n) for n in numbers}
    # The plan of the trial the kill cut off was asked again as a new trial: no file left without its row.
    assert sorted(p.name for p in (out / "plans").iterdir()) == sorted(Path(r["plan"]).name for r in _trials(out))


def test_sigterm_stops_a_search_as_ctrl_c_does_and_resume_continues_it_to_the_total(smoke, tmp_path, capsys):
    """A scheduler's stop (SIGTERM to the driver): exit 143 with the resume hint, no Ray stack dump or
    traceback, no Ray process left behind. A new search is refused the folder; --resume continues it to the asked
    total, none lost or repeated; another sampler is another experiment, refused unless forced."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "autosquash", "search", smoke, "--trials", "4", "--workers", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "trials.csv").exists() and len(_trials(out)) >= 1:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the search finished no trial in time")
    proc.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` sends it
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the search did not stop within 2 minutes of SIGTERM")
    assert proc.returncode == 143, err[-2000:]
    assert "finished trials are stored (continue with --resume)" in err
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-2000:]
    left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left in the search's session: {left}"
    done_before = {r["trial"]: r["perplexity"] for r in _trials(out) if r["state"] == "COMPLETE"}

    assert main(["search", smoke, "--trials", "4", "--out", str(out)]) == 2  # refuses to overwrite
    assert main(["search", smoke, "--trials", "5", "--workers", "1", "--out", str(out), "--resume"]) == 0
    rows = [r for r in _trials(out) if r["state"] == "COMPLETE"]
    after = {r["trial"]: r["perplexity"] for r in rows}
    assert len(rows) == 5 and all(after[t] == p for t, p in done_before.items())
    numbers = _trial_runs(out)
    assert len(numbers) == len(set(numbers)) and set(after) <= {str(n) for n in numbers}  # none logged twice
    # The resumed sampler draws new plans: a re-created TPE with the experiment's seed would replay the first's.
    assert len({(out / r["plan"]).read_text() for r in rows}) == 5
    capsys.readouterr()
    # Another sampler is another experiment: refused, unless forced (the change named, the trials kept).
    more = ["search", smoke, "--trials", "6", "--out", str(out), "--resume", "--sampler", "random"]
    assert main(more) == 2
    assert "(sampler differ)" in capsys.readouterr().err
    assert main([*more, "--force"]) == 0
    assert "--force: resuming" in capsys.readouterr().err
    now = [r for r in _trials(out) if r["state"] == "COMPLETE"]
    assert len(now) == 6 and {r["trial"]: r["perplexity"] for r in now[:5]} == after


def test_a_plan_file_written_before_its_name_was_stored_is_removed_on_resume(tmp_path):
    """The driver can die between writing a trial's plan file and storing its name on the trial: recovery
    finds the file by the trial's number, so no file is left without a row."""
    import optuna

    from autosquash.search.record import plan_rel, recover_stale

    study = optuna.create_study(directions=["minimize"])
    trial = study.ask()
    (tmp_path / "plans").mkdir()
    (tmp_path / plan_rel(trial.number)).write_text("target: gguf\n")
    tracker = type("Tracker", (), {"trial_runs": {}})()
    recover_stale(study, None, tracker, tmp_path)
    assert list((tmp_path / "plans").iterdir()) == []
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL
