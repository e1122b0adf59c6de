"""The MLflow model registry: register an exported file as a model version, pull one for deployment.

A version lives in the tracking store of the search it came from, linked to its trial's run. `pull`
asks the registries themselves where a name lives: the one it is told (`--tracking-uri`,
MLFLOW_TRACKING_URI), else the stores of the searches under a runs folder (each search folder's
`tracking_uri.txt`), so no state is kept outside the searches' own stores.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from autosquash.compress.plan import Plan, check_plan
from autosquash.errors import AutosquashError
from autosquash.files import write_text
from autosquash.models.load import load_arch
from autosquash.track.mlflow_store import search_tracking_uri
from autosquash.yaml_io import load_yaml_model

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


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
    return str(version.version)


def _search_stores(runs_dir: Path) -> list[str]:
    """Tracking URIs of the searches under `runs_dir`, each once (searches may share a store)."""
    uris: list[str] = []
    for f in sorted(runs_dir.glob("*/tracking_uri.txt")):
        uri = search_tracking_uri(f.parent)
        if uri and uri not in uris:
            uris.append(uri)
    return uris


def _holds(uri: str, name: str) -> bool:
    """Whether the registry of the store at `uri` has a model named `name`."""
    # Opening a missing SQLite file would create an empty store: a moved or deleted search is just not a match.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(name)
    except MlflowException:
        return False
    return True


def _find_registry(name: str, runs_dir: Path) -> str:
    """The one store among the searches under `runs_dir` whose registry holds model `name`."""
    matches = [u for u in _search_stores(runs_dir) if _holds(u, name)]
    if not matches:
        raise AutosquashError(
            f"no registry under {runs_dir} knows {name!r}: pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    if len(matches) > 1:
        raise AutosquashError(
            f"{name!r} is registered in {len(matches)} stores under {runs_dir}: {', '.join(matches)}; "
            "pass --tracking-uri to choose one"
        )
    return matches[0]


def pull(model_uri: str, out_dir: Path, tracking_uri: str | None = None, runs_dir: Path = Path("runs")) -> list[Path]:
    """Download a registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) into `out_dir`.

    The store is `tracking_uri`, else MLFLOW_TRACKING_URI, else the one search under `runs_dir` that holds NAME.
    """
    import mlflow.artifacts

    m = MODEL_URI.match(model_uri)
    if not m:
        raise AutosquashError(f"{model_uri!r} is not a model URI; expected models:/NAME/VERSION or models:/NAME@ALIAS")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _find_registry(m["name"], runs_dir)
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
    pulled = sorted(got_path.iterdir()) if got_path.is_dir() else [got_path]
    if got_path.is_dir() and got_path != out_dir:  # flatten NAME/ folders some stores add
        for f in pulled:
            shutil.move(str(f), out_dir / f.name)
        got_path.rmdir()
        pulled = [out_dir / f.name for f in pulled]
    check_pulled_plan(pulled, model_uri)
    write_readme(out_dir, f"{m['name']} version {version.version}", dict(version.tags))
    return sorted(out_dir.iterdir())


def check_pulled_plan(files: list[Path], model_uri: str) -> None:
    """A version's plan file must name every group of the model file it came with, and no other (a version
    registered by hand may pair a plan with another model's file); refused in one line naming both."""
    models = [f for f in files if f.suffix in (".gguf", ".safetensors") and not f.name.endswith(".lora.gguf")]
    plans = [f for f in files if f.name.startswith("trial-") and f.suffix == ".yaml"]
    if len(models) != 1 or not plans:
        return
    arch = load_arch(str(models[0]))
    for plan in plans:
        check_plan(load_yaml_model(Plan, plan), arch, f"{model_uri}: {plan.name} (for {models[0].name})")


def _num(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def run_commands(out_dir: Path) -> list[str]:
    """The llama.cpp command lines that run the model in `out_dir` (with its LoRA adapter where there is one),
    or autosquash's own for a torch-format file."""
    ggufs = sorted(f.name for f in out_dir.glob("*.gguf"))
    models = [f for f in ggufs if not f.endswith(".lora.gguf")]
    if not models:
        return [f"autosquash eval --model {f.name} --text wikipedia" for f in sorted(out_dir.glob("*.safetensors"))]
    model = models[0]
    adapter = model.removesuffix(".gguf") + ".lora.gguf"
    lora = f" --lora {adapter}" if adapter in ggufs else ""
    return [
        f"llama-cli -m {model}{lora} -p 'The capital of France is' -n 32",
        f"llama-server -m {model}{lora} --host 127.0.0.1 --port 8080",
    ]


def write_readme(out_dir: Path, title: str, tags: dict[str, str]) -> Path:
    """README.md beside a pulled model: how to run it, what the phone should give, where the plan is."""
    lines = [f"# {title}", ""]
    what = [f"{k} {tags[k]}" for k in ("model", "search", "trial") if k in tags]
    if what:
        lines += [f"Compressed by autosquash: {', '.join(what)}.", ""]
    lines += ["## Run it", "", *[f"    {c}" for c in run_commands(out_dir)], ""]
    if "lora_adapter" in tags:
        lines += [f"Healing: {tags['lora_adapter']}.", ""]
    mem, tps, jpt = (_num(tags, k) for k in ("peak_memory_bytes", "decode_tokens_per_s", "energy_j_per_token"))
    hours = _num(tags, "hours_continuous_generation")
    if any(v is not None for v in (mem, tps, jpt, hours)):
        # Versions registered before the phone's tag was renamed call it `device`.
        phone = tags.get("phone") or tags.get("device", "the phone")
        lines += [f"## On {phone} (autosquash's cost model)", ""]
        lines += ["| peak memory | decode | energy | battery, generating without pause |", "|---|---|---|---|"]
        cells = [
            "-" if mem is None else f"{mem / 1e6:.0f} MB",
            "-" if tps is None else f"{tps:.1f} tokens/s",
            "-" if jpt is None else f"{jpt:.3f} J/token",
            "-" if hours is None else f"{hours:.1f} h",
        ]
        lines += ["| " + " | ".join(cells) + " |", ""]
    quality = [f"{k} {tags[k]}" for k in ("perplexity", "kl", "bits_per_weight") if k in tags]
    if quality:
        lines += ["## Quality (held-out text, against the uncompressed model)", "", ", ".join(quality) + ".", ""]
    plans = sorted(f.name for f in out_dir.glob("trial-*.yaml"))
    if plans:
        lines += ["## Plan", "", f"Per-layer choices: `{plans[0]}`.", ""]
    path = out_dir / "README.md"
    write_text(path, "\n".join(lines))
    return path
