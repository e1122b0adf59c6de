"""A finished trial rebuilt exactly as it was evaluated (its plan, its seed, its worker's torch threads, the
search's stored layers): what `autosquash export --run --trial` writes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from autosquash.compress.apply import VariantCache
from autosquash.compress.plan import Plan, check_plan
from autosquash.errors import AutosquashError
from autosquash.export.build import KEEP_ALL, BuiltModel, deploys_factors
from autosquash.models.load import resolve_model
from autosquash.search.experiment import Experiment, load_experiment
from autosquash.search.trial import build_plan, load_inputs, open_store, prepare_context, trial_seed
from autosquash.yaml_io import load_yaml_model


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` torch threads (None: as is), then restore the count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trial_threads(run: Path, experiment: str, number: int) -> int | None:
    """The torch thread count trial `number` ran with, from its MLflow run (None if not recorded)."""
    from mlflow.exceptions import MlflowException

    from autosquash.track.mlflow_store import find_trial_run, search_tracking_uri

    uri = search_tracking_uri(run)
    if uri is None:
        return None
    try:
        trial_run = find_trial_run(uri, experiment, number)
    except MlflowException:  # a tracking server out of reach: rebuild with this process's threads
        return None
    threads = None if trial_run is None else trial_run.data.metrics.get("torch_threads")
    return int(threads) if threads else None


def _check_finished(run: Path, number: int) -> None:
    """Refuse a trial the search's table does not list as completed (failed, or still running)."""
    import csv

    table = run / "trials.csv"
    if not table.is_file():
        return  # a search stopped before its first trial finished: the plan file's absence is the error then
    with table.open() as f:
        row = next((r for r in csv.DictReader(f) if r.get("trial") == str(number)), None)
    if row is None:
        raise AutosquashError(f"trial {number} of {run} did not finish (trials.csv does not list it)")
    if row.get("state") != "COMPLETE":
        reason = f": {row['error']}" if row.get("error") else ""
        raise AutosquashError(f"trial {number} of {run} did not finish (state {row.get('state')}{reason})")


def rebuild_trial(run: Path, number: int) -> tuple[BuiltModel, Experiment, Path]:
    """Trial `number` of the search in `run`, exactly as it was evaluated: (its BuiltModel, the experiment,
    its plan file)."""
    if not (run / "experiment.yaml").is_file():
        raise AutosquashError(f"{run} is not a search's output folder (it has no experiment.yaml)")
    plan_file = run / "plans" / f"trial-{number:04d}.yaml"
    if not plan_file.exists():
        raise AutosquashError(f"{run} holds no trial {number} ({plan_file} is missing)")
    _check_finished(run, number)
    exp = load_experiment(run / "experiment.yaml")
    base_model = resolve_model(exp.model)
    plan = check_plan(load_yaml_model(Plan, plan_file), base_model.arch, str(plan_file))  # before the weights
    inputs = load_inputs(exp, run, model=base_model)
    ctx = prepare_context(exp, inputs, workers=1, test_split=False)  # the trial's context: healing batch, config
    # The search's store holds the very bytes the trial was scored with, whichever worker made them.
    cache = VariantCache(max_bytes=KEEP_ALL, store=open_store(ctx))
    threads = _trial_threads(run, exp.name, number)
    if threads is None and deploys_factors(inputs.arch, plan):
        print(
            f"note: trial {number} has no torch thread count recorded; "
            "its SVD/Kronecker factors may differ from the trial's in their last bits"
        )
    with _threads(threads):
        model, info = build_plan(ctx, plan, trial_seed(exp.seed, number), cache)
    built = BuiltModel(base_model, inputs.base, inputs.arch, plan, inputs.stats, model, cache, info)
    return built, exp, plan_file
