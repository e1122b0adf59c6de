"""`autosquash ui --optuna` serves optuna-dashboard on a search's study, on localhost, and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest

START_S = 60  # optuna-dashboard imports optuna and bottle; on a loaded 2-core machine that takes seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study(out) -> None:
    out.mkdir()
    study = optuna.create_study(
        study_name="tiny-search", storage=f"sqlite:///{out / 'optuna.db'}", directions=["minimize", "minimize"]
    )
    for x in (1.0, 2.0, 3.0):
        t = study.ask()
        t.suggest_float("x", 0.0, 4.0)
        study.tell(t, [x, 4.0 - x])


def test_ui_optuna_serves_the_study_on_localhost_and_stops_on_ctrl_c(tmp_path):
    out = tmp_path / "run"
    _study(out)
    port = _free_port()
    cmd = [sys.executable, "-m", "autosquash", "ui", "--out", str(out), "--optuna", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As in a terminal: a background job of a non-interactive shell (CI, nohup) inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline, studies = time.monotonic() + START_S, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        assert studies is not None, f"optuna-dashboard did not answer within {START_S} s"
        names = [s["study_name"] for s in studies["study_summaries"]]
        assert names == ["tiny-search"]
        assert studies["study_summaries"][0]["directions"] == ["minimize", "minimize"], studies
        with pytest.raises(OSError):  # bound to localhost only: not on the machine's other addresses
            other = socket.gethostbyname(socket.gethostname())
            if other.startswith("127."):
                raise OSError("no address but loopback to try")
            socket.create_connection((other, port), timeout=2).close()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole process group
        text, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130  # a Ctrl-C'd command's exit, as a shell reports it
    assert f"optuna-dashboard on http://127.0.0.1:{port}" in text and "Traceback" not in text


def test_ui_optuna_without_a_study_is_one_line(tmp_path, capsys):
    from autosquash.cli import main

    assert main(["ui", "--out", str(tmp_path), "--optuna"]) == 2
    assert "holds no Optuna study (no optuna.db)" in capsys.readouterr().err
