"""MLflow layout of a search: one parent run (role=search), one nested run per trial (role=trial).

Written through MlflowClient with explicit run ids, so nothing depends on a global active run and a
resumed search finds its parent and the trials it already logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

ROLE, TRIAL, PARETO, ORIGIN = "autosquash.role", "autosquash.trial", "autosquash.pareto", "autosquash.origin"
MAX_BATCH = 100  # MLflow's limit of params per log_batch call
# The experiment's kind, which MLflow 3's UI reads to choose between its GenAI and its model-training pages
# (where its global workflow switch is off; where it is on, the link `runs_page` makes says so).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# The metrics a user sorts trials by: the columns of the runs table in the view `autosquash ui` opens.
COLUMNS = ("kl", "perplexity", "weights_mb", "memory_mb", "energy_mj_per_token", "tokens_per_s", "bits_per_weight")
COLUMNS += ("pareto", "test_kl", "test_perplexity")  # the test split's: front plans only
# A view of the runs table stored in the experiment, as the UI's own "share view" stores one (an experiment tag
# mlflow.sharedViewState.<key> holding its JSON, opened by ?viewStateShareKey=<key>).
VIEW_KEY = "autosquash-front"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_STATE = {
    "orderByKey": "metrics.`kl`",
    "orderByAsc": True,
    "selectedColumns": [
        "attributes.`Dataset`",
        *(f"metrics.`{k}`" for k in COLUMNS),
        f"tags.`{ORIGIN}`",
    ],
}


@dataclass(frozen=True)
class TokenSet:
    """A token set trials were measured on, logged as an MLflow dataset input of every trial run."""

    name: str  # e.g. "lambada"
    context: str  # calibration | evaluation
    tokens: list[list[int]]

    def entity(self) -> DatasetInput:
        flat = [t for row in self.tokens for t in row]
        digest = hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()[:8]
        profile = json.dumps({"sequences": len(self.tokens), "tokens": len(flat)})
        source = json.dumps({"uri": f"autosquash texts: {self.name}"})
        dataset = Dataset(
            name=f"{self.name} ({self.context})", digest=digest, source_type="local", source=source, profile=profile
        )
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", self.context)])


def default_tracking_uri(out_dir: Path) -> str:
    """The embedded store: SQLite inside the search's output folder."""
    return f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"


def search_tracking_uri(run: Path) -> str | None:
    """Where the search in `run` keeps its MLflow runs (its tracking_uri.txt), None where it names none.

    A folder moved or copied since its search reads its own embedded store, not the one at the old path.
    """
    f = run / "tracking_uri.txt"
    uri = f.read_text().strip() if f.is_file() else ""
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db") and (run / "mlflow.db").is_file():
        return default_tracking_uri(run)
    return uri or None


def find_trial_run(tracking_uri: str, experiment_name: str, trial: int):
    """The MLflow run of one trial of a search (the newest, should a store hold several searches)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    runs = (
        []
        if exp is None
        else client.search_runs(
            [exp.experiment_id], f"tags.`{ROLE}` = 'trial' and tags.`{TRIAL}` = '{trial}'", order_by=["start_time DESC"]
        )
    )
    return runs[0] if runs else None


def log_to_search_run(tracking_uri: str, experiment_name: str, files: list[Path]) -> bool:
    """Attach `files` to the newest search run of `experiment_name` (replacing same-named artifacts), as a tool
    that runs after the search does (the peer benchmark's re-drawn plots); False where the store has none."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    runs = (
        []
        if exp is None
        else client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'search'", order_by=["start_time DESC"])
    )
    for f in files if runs else ():
        client.log_artifact(runs[0].info.run_id, str(f))
    return bool(runs)


class SearchTracker:
    """The MLflow runs of one search."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_dir: Path):
        # MLflow announces each creation and migration of its SQLite tables at INFO: not news to a user.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=artifact_dir.resolve().as_uri()
            )
        else:
            self.experiment_id = exp.experiment_id
        self.client.set_experiment_tag(self.experiment_id, KIND_TAG, KIND)
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG, json.dumps(VIEW_STATE))
        self.parent_id: str | None = None
        self.trial_runs: dict[int, str] = {}
        self.datasets: list[DatasetInput] = []

    def token_sets(self, sets: list[TokenSet]) -> None:
        """The token sets every trial run logs as its datasets (the runs table's Dataset column)."""
        self.datasets = [s.entity() for s in sets]

    def start(self, parent_id: str | None, run_name: str, params: dict[str, str]) -> str:
        """Open (or, on resume, reopen) the parent run and learn which trials it already holds."""
        if parent_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={ROLE: "search"})
            parent_id = run.info.run_id
            self._log_params(parent_id, params)
        else:
            self.client.update_run(parent_id, status="RUNNING")
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{ROLE}` = 'trial'",
                max_results=50000,
            )
            self.trial_runs = {int(r.data.tags[TRIAL]): r.info.run_id for r in runs}
        self.parent_id = parent_id
        return parent_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, params=items[i : i + MAX_BATCH])

    def log_trial(
        self,
        number: int,
        params: dict[str, str],
        metrics: dict[str, float],
        tags: dict[str, str],
        plan_file: Path,
        failed: bool,
        run_name: str | None = None,
    ) -> str:
        """One nested run for a finished trial; a trial already logged is not logged again."""
        if number in self.trial_runs:
            return self.trial_runs[number]
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name or f"trial-{number:04d}",
            tags={"mlflow.parentRunId": self.parent_id, ROLE: "trial", TRIAL: str(number), **tags},
        )
        rid = run.info.run_id
        self._log_params(rid, params)
        if self.datasets:
            self.client.log_inputs(rid, datasets=self.datasets)
        finite = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(finite), 1000):
            self.client.log_batch(rid, metrics=finite[i : i + 1000])
        self.client.log_artifact(rid, str(plan_file))
        self.client.set_terminated(rid, status="FAILED" if failed else "FINISHED")
        self.trial_runs[number] = rid
        return rid

    def metric(self, number: int, key: str) -> float | None:
        """Metric `key` of trial `number`'s run, or None when it has none."""
        rid = self.trial_runs.get(number)
        return None if rid is None else self.client.get_run(rid).data.metrics.get(key)

    def log_metrics(self, number: int, metrics: dict[str, float]) -> None:
        """Add metrics to a finished trial's run (the front's benchmark scores, say)."""
        items = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.trial_runs[number], metrics=items[i : i + 1000])

    def mark_front(self, front: set[int]) -> None:
        """Tag every trial run `autosquash.pareto=true|false` and log its metric `pareto` (1 or 0, a column to
        sort by) as the front now stands."""
        for number, rid in self.trial_runs.items():
            on = number in front
            self.client.log_batch(
                rid, metrics=[Metric("pareto", float(on), 0, 0)], tags=[RunTag(PARETO, "true" if on else "false")]
            )

    def describe_search(self, markdown: str, front: list[dict]) -> None:
        """The parent run's description (markdown, shown on its page) and the front as a table artifact."""
        self.client.set_tag(self.parent_id, "mlflow.note.content", markdown)
        if front:
            columns = {k: [r.get(k) for r in front] for k in front[0]}
            self.client.log_table(self.parent_id, data=columns, artifact_file="front_table.json")

    def log_trial_artifact(self, number: int, path: Path, folder: str = "layers") -> None:
        """Attach a file to a logged trial's run, under `folder`."""
        self.client.log_artifact(self.trial_runs[number], str(path), artifact_path=folder)

    def log_search_artifacts(self, files: list[Path], metrics: dict[str, float]) -> None:
        """Attach the search's tables to the parent run."""
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])

    def finish(self, status: str = "FINISHED") -> None:
        """Close the parent run with `status` (FINISHED, KILLED or FAILED)."""
        self.client.set_terminated(self.parent_id, status=status)


def runs_page(tracking_uri: str, base_url: str) -> str:
    """The UI address of the runs table in autosquash's view (metric columns, sorted by KL) of the store's
    search, or the UI's front page when the store holds no autosquash search."""
    client = MlflowClient(tracking_uri=tracking_uri)
    for exp in client.search_experiments():
        if VIEW_TAG in exp.tags:
            # workflowType: MLflow 3.x's UI opens every experiment in its GenAI view unless told (its global
            # switch outranks the experiment's kind tag); the link keeps it as the user moves on.
            query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
            return f"{base_url}/#/experiments/{exp.experiment_id}/runs?{query}"
    return base_url
