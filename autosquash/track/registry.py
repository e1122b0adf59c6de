"""The MLflow model registry: register an exported file as a model version, pull one for deployment.

A version lives in the tracking store of the search it came from, linked to its trial's run; a small
index (`~/.autosquash/registries.json`, a plain name -> tracking URI map) lets `pull` find it later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from autosquash.errors import AutosquashError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def _index_path() -> Path:
    return Path(os.environ.get("AUTOSQUASH_HOME", Path.home() / ".autosquash")) / "registries.json"


def _index() -> dict[str, str]:
    p = _index_path()
    return json.loads(p.read_text()) if p.exists() else {}


def register(tracking_uri: str, name: str, files: list[Path], run_id: str, tags: dict[str, str]) -> str:
    """Log `files` under the trial run's `export/` artifacts and register them as a new version of `name`."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="export")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Compressed by autosquash; pull with `autosquash pull`.")
    source = f"{client.get_run(run_id).info.artifact_uri}/export"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    index = _index()
    index[name] = tracking_uri
    _index_path().parent.mkdir(parents=True, exist_ok=True)
    _index_path().write_text(json.dumps(index, indent=2))
    return str(version.version)


def pull(model_uri: str, out_dir: Path, tracking_uri: str | None = None) -> list[Path]:
    """Download a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) into `out_dir`."""
    import mlflow.artifacts

    m = MODEL_URI.match(model_uri)
    if not m:
        raise AutosquashError(f"{model_uri!r} is not a model URI; expected models:/NAME/VERSION or models:/NAME@ALIAS")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _index().get(m["name"])
    if uri is None:
        raise AutosquashError(
            f"no registry knows {m['name']!r}: pass --tracking-uri, set MLFLOW_TRACKING_URI, or register it first"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if m["version"]:
            version = client.get_model_version(m["name"], m["version"])
        else:
            version = client.get_model_version_by_alias(m["name"], m["alias"])
        got = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(out_dir))
    except MlflowException as e:
        raise AutosquashError(f"cannot pull {model_uri} from {uri}: {str(e).splitlines()[0]}") from None
    got_path = Path(got)
    if got_path.is_dir() and got_path != out_dir:  # flatten NAME/ folders some stores add
        for f in got_path.iterdir():
            shutil.move(str(f), out_dir / f.name)
        got_path.rmdir()
    return sorted(out_dir.iterdir())
