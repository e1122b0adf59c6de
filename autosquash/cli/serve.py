"""`autosquash ui`: the MLflow UI or optuna-dashboard on a search's stores, on localhost, stopped quietly by Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from autosquash.errors import AutosquashError, was_terminated


def ui_command(args: argparse.Namespace) -> int:
    from autosquash.track.mlflow_store import default_tracking_uri, runs_page

    out = Path(args.out)
    if args.optuna:
        study = out / "optuna.db"
        if not study.is_file():
            raise AutosquashError(f"{out} holds no Optuna study (no optuna.db); pass the search's --out folder")
        port = args.port or 8080
        check_port_free(args.host, port)
        serve = "import sys, optuna_dashboard as d; d.run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))"
        cmd = [sys.executable, "-c", serve, f"sqlite:///{study.resolve()}", args.host, str(port)]
        print(f"optuna-dashboard on http://{args.host}:{port} (Ctrl-C stops it)", flush=True)
    else:
        if not (out / "mlflow.db").exists():
            raise AutosquashError(f"{out} holds no search (no mlflow.db); pass the search's --out folder")
        port = args.port or 5000
        check_port_free(args.host, port)
        uri = default_tracking_uri(out)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
        cmd += ["--port", str(port)]
        # The runs table in autosquash's view: metric columns, sorted by KL (the trials nested under the search).
        print(f"MLflow UI on {runs_page(uri, f'http://{args.host}:{port}')} (Ctrl-C stops it)", flush=True)
    return run_server(cmd)


SERVER_STOP_S = 10.0  # how long a stopped server may take to shut down before it is killed


def run_server(cmd: list[str]) -> int:
    """Run a server until it ends (its exit status) or Ctrl-C (130; 143 for SIGTERM).

    It runs in a session of its own, so a terminal's Ctrl-C reaches this process only: sent to the server's
    processes too (MLflow's web workers and job runners), each would print its own traceback. It is stopped from
    here, its whole process group with SIGTERM, and what it prints while shutting down is not shown.
    """
    import os
    import subprocess
    import threading

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines as it writes them, through the pipes
    pipe = subprocess.PIPE
    server = subprocess.Popen(cmd, start_new_session=True, stdout=pipe, stderr=pipe, env=env)
    stopping = threading.Event()

    def relay(source, stream) -> None:
        for line in iter(source.readline, b""):
            if not stopping.is_set():
                stream.write(line.decode(errors="replace"))
                stream.flush()

    relays = [
        threading.Thread(target=relay, args=(server.stdout, sys.stdout), daemon=True),
        threading.Thread(target=relay, args=(server.stderr, sys.stderr), daemon=True),
    ]
    for t in relays:
        t.start()
    try:
        code = server.wait()
    except KeyboardInterrupt as e:
        stopping.set()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent, or did not stop
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return 143 if was_terminated(e) else 130
    for t in relays:
        t.join()
    return code


def check_port_free(host: str, port: int) -> None:
    """Fail before starting a server when `port` on `host` is taken (or the host is not this machine's)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise AutosquashError(f"cannot serve on {host}:{port} ({e.strerror}); pass another --port") from None
