"""What a search keeps of its trials in Optuna's storage and MLflow, and how a stopped search resumes: the check that
a resumed search is the one stored, the settling of trials a killed driver left running, the asking of plans no
trial holds yet, and the recording of each finished trial (MLflow first, then Optuna's tell).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import optuna

from autosquash.compress.plan import Plan
from autosquash.errors import AutosquashError
from autosquash.search.experiment import Experiment, load_experiment
from autosquash.search.outputs import INTERRUPTED, OBJECTIVE_METRIC, counted_trials, trial_run_name
from autosquash.search.space import SearchSpace, params_key
from autosquash.track.mlflow_store import ORIGIN, SearchTracker

# What a resumed search may change: its budget and workers, and the resources a worker may use. Anything
# else would mix trials of two experiments in one study (and `export --run` rebuilds with the stored one).
RESUMABLE = {"trials", "workers"}


RESUMABLE_HARDWARE = {"gpus_per_worker", "variant_cache_bytes", "variant_store_bytes", "heal_activation_bytes"}


def check_same_experiment(exp: Experiment, out: Path, force: bool = False) -> list[str]:
    """Refuse to resume the search in `out` with an experiment other than the one it ran; with `force`, the
    fields that differ."""
    stored = out / "experiment.yaml"
    if not stored.is_file():
        return []
    was, now = load_experiment(stored).model_dump(mode="json"), exp.model_dump(mode="json")
    diffs = [k for k in now if k not in RESUMABLE | {"hardware"} and was.get(k) != now[k]]
    diffs += [
        f"hardware.{k}"
        for k in now["hardware"]
        if k not in RESUMABLE_HARDWARE and was["hardware"].get(k) != now["hardware"][k]
    ]
    if diffs and not force:
        raise AutosquashError(
            f"--resume: {out} was searched with another experiment ({', '.join(diffs)} differ); resume with the "
            f"same settings ({stored} holds them), start a new --out, or pass --force to mix them"
        )
    return diffs


def warn_forced(out: Path, changed: list[str]) -> None:
    print(
        f"autosquash: --force: resuming {out} with {', '.join(changed)} changed; the trials stored before were "
        "measured with the old settings, and `export --run` rebuilds every trial with the new ones",
        file=sys.stderr,
    )


def finished(study: optuna.Study) -> int:
    return len(counted_trials(study))


def plan_rel(number: int) -> str:
    """Where trial `number`'s plan file lies, relative to the output folder."""
    return f"plans/trial-{number:04d}.yaml"


def recover_stale(study: optuna.Study, exp: Experiment, tracker: SearchTracker, out: Path) -> None:
    """Settle trials a killed driver left RUNNING.

    A trial whose result was already stored (it is in MLflow) is told with that result; one that was
    still running is marked interrupted (it does not count), its plan file removed and its plan asked again
    (as a new trial, with a file of its own).
    """
    interrupted = list(study.user_attrs.get(INTERRUPTED, []))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number in tracker.trial_runs and "error" not in t.user_attrs:
            study.tell(t.number, [float(t.user_attrs[OBJECTIVE_METRIC[o]]) for o in exp.objectives])
        elif t.number in tracker.trial_runs:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        else:
            interrupted.append(t.number)
            study.set_user_attr(INTERRUPTED, interrupted)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            # By its number: the driver may have died between writing the file and storing its name.
            (out / plan_rel(t.number)).unlink(missing_ok=True)
            # All of an enqueued plan (a baseline's, say), not only the parameters set before the driver died.
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            study.enqueue_trial(params, user_attrs={"origin": t.user_attrs.get("origin", "sampled")})


MAX_REDRAWS = 50  # repeats in a row after which a plan not tried yet is drawn at random instead


def tried_plans(study: optuna.Study, running: list) -> set[tuple]:
    """The `params_key` of every plan a counted trial (completed or failed) or a running one holds."""
    return {params_key(t.params) for t in [*counted_trials(study), *running]}


def ask_new(study: optuna.Study, space: SearchSpace, arch, running: list) -> tuple | None:
    """A trial and its plan that no completed or running trial holds; None when the space holds no plan that
    has not been tried (completed, failed or running): the search has nothing new to ask.

    Samplers repeat themselves (TPE re-proposes a plan it likes; a sampler re-created on resume replays its
    draws): a repeat is told PRUNED, which neither the budget nor the tables count, and the sampler asked
    again. After MAX_REDRAWS repeats in a row (and once no enqueued trial waits) a plan not tried yet is
    enqueued, drawn at random, so a small space is searched to its end rather than redrawn for ever.
    """
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    held = {params_key(t.params) for t in [*done, *running]}
    tried = tried_plans(study, running)
    if sum(space.holds(k, arch) for k in tried) >= space.plan_count(arch):
        return None
    waiting, repeats = (optuna.trial.TrialState.WAITING,), 0
    while True:
        trial = study.ask()
        plan = space.sample(trial, arch)
        if params_key(trial.params) not in held:
            return trial, plan
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        repeats += 1
        if repeats >= MAX_REDRAWS and not study.get_trials(deepcopy=False, states=waiting):
            params = space.untried_params(arch, tried, random.Random(len(study.trials)))
            study.enqueue_trial(params, user_attrs={"origin": "random"})


def failure_reason(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"[:300]


def record(study, trial, plan: Plan, metrics, error, exp: Experiment, tracker: SearchTracker, out: Path) -> None:
    """Store a finished trial: user attributes and MLflow run first, then tell, so a crash in between
    is settled on resume from what was stored."""
    origin = trial.user_attrs["origin"]
    if metrics is None:
        trial.set_user_attr("error", error)
        tracker.log_trial(
            trial.number,
            plan.flat_params(),
            {},
            {ORIGIN: origin, "autosquash.error": error},
            out / trial.user_attrs["plan"],
            failed=True,
            run_name=trial_run_name(trial.number, plan, None),
        )
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    for k in (
        "perplexity",
        "kl",
        "memory_mb",
        "energy_mj_per_token",
        "tokens_per_s",
        "weights_mb",
        "trial_s",
        "constraint_mb",
    ):
        trial.set_user_attr(k, round(float(metrics[k]), 6))
    for k in ("bits_per_weight", "block_bits_per_weight"):
        trial.set_user_attr(k, round(float(metrics[k]), 4))
    trial.set_user_attr("fits", bool(metrics["fits"]))
    # Feasible when <= 0: a plan that does not fit the phone stays visible but off the front.
    trial.set_constraint("memory_over_limit_mb", float(metrics["constraint_mb"]))
    tags = {
        ORIGIN: origin,
        "autosquash.worker": trial.user_attrs["worker"],
        "autosquash.device": trial.user_attrs["device"],
    }
    name = trial_run_name(trial.number, plan, metrics)
    tracker.log_trial(
        trial.number, plan.flat_params(), metrics, tags, out / trial.user_attrs["plan"], failed=False, run_name=name
    )
    values = [float(metrics[OBJECTIVE_METRIC[o]]) for o in exp.objectives]
    if not all(math.isfinite(v) for v in values):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, values)
