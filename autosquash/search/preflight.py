"""What a search checks before it writes or loads anything: the model reference, the phone, the search
space, and the addresses it was given (Optuna storage, MLflow tracking, Ray cluster), each in seconds and
each failing as one line that names the option; and whether an output folder holds a search at all."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from autosquash.errors import AutosquashError
from autosquash.files import check_creatable

CONNECT_TIMEOUT_S = 5.0


def _connect(option: str, value: str, host: str | None, port: int | None, what: str) -> socket.socket:
    if not host or port is None:
        raise AutosquashError(f"{option} {value}: not an address with a host and a port")
    try:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise AutosquashError(f"{option} {value}: no {what} answers at {host}:{port} ({reason})") from None


# An HTTP/2 client's opening: the connection preface and an empty SETTINGS frame. A gRPC server (Ray's GCS and
# its client server speak gRPC) answers with a SETTINGS frame of its own: 9 header bytes whose 4th is type 4.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_grpc(sock: socket.socket) -> bool:
    try:
        sock.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
        return head[3] == 4
    except OSError:
        return False
    finally:
        sock.close()


def check_ray_address(address: str) -> None:
    """A Ray cluster's address (host:port or ray://host:port) must answer within seconds; 'auto' is Ray's."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    sock = _connect("--ray-address", address, parts.hostname, port, "Ray cluster")
    if not _speaks_grpc(sock):  # something else listens there: Ray would retry for minutes
        raise AutosquashError(
            f"--ray-address {address}: what answers at {parts.hostname}:{port} is not a Ray cluster (it does not speak"
            " gRPC); give the head node's GCS address (host:6379) or its client address (ray://host:10001)"
        )


def check_tracking_uri(uri: str) -> None:
    """An MLflow tracking URI must name a server that answers, or a store MLflow can open."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        _connect("--tracking-uri", uri, parts.hostname, port, "MLflow server").close()
        _mlflow_answers(uri)
        return
    from mlflow.tracking import MlflowClient

    if parts.scheme and parts.scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise AutosquashError(
            f"--tracking-uri {uri}: MLflow stores runs in {', '.join(TRACKING_SCHEMES)} (scheme://...), "
            f"not {parts.scheme}://"
        )
    if parts.scheme.split("+")[0] == "sqlite" and _new_sqlite_file("--tracking-uri", uri):
        return  # MLflow makes it, and its folders, when the search starts: a check makes nothing
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # MLflow raises many kinds for a store it cannot open
        raise AutosquashError(f"--tracking-uri {uri}: MLflow cannot open it ({_why(e, uri)})") from None


def _new_sqlite_file(option: str, url: str) -> bool:
    """Whether the SQLite database file `url` names is still to be made; refused in one line where it cannot be
    (the path a folder, a file where a folder must be, a folder this user may not write)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False  # the store's own check names what is wrong with it
    db = parsed.database
    if not db or db == ":memory:":
        return False
    path = Path(db.removeprefix("file:") if parsed.query.get("uri") == "true" else db).expanduser()
    if db.endswith("/") or path.is_dir():
        raise AutosquashError(f"{option} {url}: names a folder, not a database file (e.g. {path / 'mlflow.db'})")
    if path.exists():
        return False
    check_creatable(path.parent, f"{option} {url}")
    return True


def _mlflow_answers(uri: str) -> None:
    """The server at `uri` must answer MLflow's REST API (not just any web server on that port)."""
    import urllib.error
    import urllib.request

    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(probe, timeout=CONNECT_TIMEOUT_S) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        raise AutosquashError(f"--tracking-uri {uri}: no MLflow server answers ({getattr(e, 'reason', e)})") from None
    if status in (401, 403):
        return  # a server that wants credentials: MLflow's own environment variables carry them
    if status != 200:
        raise AutosquashError(
            f"--tracking-uri {uri}: the server there is not an MLflow tracking server (HTTP {status})"
        )


# How long a write to an SQLite store waits for another process's lock (a dashboard, `report`, a second
# search on the folder) before it fails: SQLite's own 5 s is shorter than a reader of a large study holds it.
STORE_TIMEOUT_S = 60.0


def optuna_storage(url: str):
    """Optuna's storage for `url`; an SQLite file waits up to STORE_TIMEOUT_S for another process's lock."""
    import optuna

    kwargs = {"connect_args": {"timeout": STORE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def check_storage(url: str) -> None:
    """An Optuna storage URL must be one Optuna can open (its database reachable, its folder there)."""
    try:
        optuna_storage(url)
    except Exception as e:  # SQLAlchemy raises many kinds for a URL it cannot use
        raise AutosquashError(f"--storage {url}: Optuna cannot open it ({_why(e, url)})") from None


# MLflow's tracking stores by URI scheme (a database's dialect may add a driver: postgresql+psycopg2).
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
# The database drivers SQLAlchemy loads for a URL's dialect, by the package that installs them.
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL (and a mysql+pymysql:// URL)", "mssql": "pyodbc"}


def _why(e: Exception, url: str) -> str:
    """The first line of a store's error, with the package to install when its database driver is missing."""
    dialect = urlsplit(url).scheme.split("+")[0]
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    missing = isinstance(e, ImportError) or "No module named" in first or "Failed to import DB access" in first
    if missing and dialect in DRIVERS:
        return f"{dialect}'s database driver is not installed: pip install {DRIVERS[dialect]}"
    return first[:200]


def stored_trials(out: Path) -> int | None:
    """Trials the folder's own Optuna database holds, enqueued ones left out (None: there is none). A database
    with none is what a start that failed before its first trial leaves: nothing to lose, so it does not block
    a new search."""
    db = out / "optuna.db"
    if not db.exists():
        return None
    import optuna

    storage = optuna_storage(f"sqlite:///{db.resolve()}")
    waiting = optuna.trial.TrialState.WAITING  # enqueued baselines a failed start never ran
    return sum(
        sum(
            t.state != waiting
            for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
        )
        for s in optuna.get_all_study_summaries(storage)
    )
