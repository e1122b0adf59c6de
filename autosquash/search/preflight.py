"""What a search checks before it writes or loads anything: the model reference, the phone, the search
space, and the addresses it was given (Optuna storage, MLflow tracking, Ray cluster), each in seconds and
each failing as one line that names the option; and whether an output folder holds a search at all."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from autosquash.errors import AutosquashError

CONNECT_TIMEOUT_S = 5.0


def _reachable(option: str, value: str, host: str | None, port: int | None, what: str) -> None:
    if not host or port is None:
        raise AutosquashError(f"{option} {value}: not an address with a host and a port")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise AutosquashError(f"{option} {value}: no {what} answers at {host}:{port} ({reason})") from None


def check_ray_address(address: str) -> None:
    """A Ray cluster's address (host:port or ray://host:port) must answer within seconds; 'auto' is Ray's."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    _reachable("--ray-address", address, parts.hostname, port, "Ray cluster")


def check_tracking_uri(uri: str) -> None:
    """An MLflow tracking URI must name a server that answers, or a store MLflow can open."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        _reachable("--tracking-uri", uri, parts.hostname, port, "MLflow server")
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # MLflow raises many kinds for a store it cannot open
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AutosquashError(f"--tracking-uri {uri}: MLflow cannot open it ({first[:200]})") from None


def check_storage(url: str) -> None:
    """An Optuna storage URL must be one Optuna can open (its database reachable, its folder there)."""
    import optuna

    try:
        optuna.storages.RDBStorage(url)
    except Exception as e:  # SQLAlchemy raises many kinds for a URL it cannot use
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AutosquashError(f"--storage {url}: Optuna cannot open it ({first[:200]})") from None


def stored_trials(out: Path) -> int | None:
    """Trials the folder's own Optuna database holds, enqueued ones left out (None: there is none). A database
    with none is what a start that failed before its first trial leaves: nothing to lose, so it does not block
    a new search."""
    db = out / "optuna.db"
    if not db.exists():
        return None
    import optuna

    url = f"sqlite:///{db.resolve()}"
    waiting = optuna.trial.TrialState.WAITING  # enqueued baselines a failed start never ran
    return sum(
        sum(
            t.state != waiting
            for t in optuna.load_study(study_name=s.study_name, storage=url).get_trials(deepcopy=False)
        )
        for s in optuna.get_all_study_summaries(url)
    )
