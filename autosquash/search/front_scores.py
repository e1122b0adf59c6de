"""The front's scores to report: every front plan rebuilt on the workers and scored on the test split (tokens the
search did not select on) and by lm-eval, logged on its trial's MLflow run and written beside its proxies."""

from __future__ import annotations

from pathlib import Path

from autosquash.compress.plan import Plan
from autosquash.evaluate.benchmark import contamination_notes, mean_accuracy, mean_accuracy_stderr, ranks_plans
from autosquash.search.experiment import Experiment
from autosquash.search.outputs import BENCH, COLUMNS, TEST_COLUMNS, write_csv
from autosquash.search.record import failure_reason
from autosquash.search.trial import run_front_scores, trial_seed
from autosquash.track.mlflow_store import SearchTracker
from autosquash.yaml_io import load_yaml_model


def score_front(
    front: list[dict],
    exp: Experiment,
    ctx_box: list,
    tracker: SearchTracker,
    out: Path,
    test: bool,
    resources: dict[str, float],
) -> None:
    """Every front plan scored on the test split (tokens the search did not select on: the numbers to report)
    and by lm-eval, in parallel on the workers, logged on each trial's run beside its proxies; a task built
    from the search's own texts is flagged, since its scores are not held-out.

    A plan is rebuilt exactly as its trial built it (same plan, same healing seed). Front plans that already
    carry their scores (a resumed search) are not run again.
    """
    import ray

    spec = exp.benchmark
    todo = [
        r
        for r in front
        if (spec.tasks and tracker.metric(int(r["trial"]), BENCH) is None)
        or (test and tracker.metric(int(r["trial"]), "test_kl") is None)
    ]
    _announce(len(todo), exp, test)
    task = ray.remote(**resources, max_retries=2, retry_exceptions=False)(run_front_scores)
    refs = {}
    for r in todo:
        plan = load_yaml_model(Plan, out / r["plan"])
        seed = trial_seed(exp.seed, int(r["trial"]))
        refs[task.remote(ctx_box, plan.model_dump(mode="json"), seed, spec.tasks, spec.limit)] = r
    while refs:
        (ref,), _ = ray.wait(list(refs), num_returns=1)
        row = refs.pop(ref)
        try:
            scores = ray.get(ref)
        except Exception as e:  # a scoring that fails leaves the trial's proxies as they are
            print(f"  trial {row['trial']}: scoring failed: {failure_reason(e)}", flush=True)
            continue
        metrics, parts = _front_metrics(scores)
        tracker.log_metrics(int(row["trial"]), metrics)
        print(f"  trial {row['trial']:>4}: {'; '.join(parts)}", flush=True)
    if spec.tasks:
        say_if_lm_eval_cannot_rank(front, spec, tracker)


def _announce(plans: int, exp: Experiment, test: bool) -> None:
    """The line saying what the front's `plans` are scored on, and a note for each lm-eval task that shares
    passages with the search's own texts."""
    spec = exp.benchmark
    what = [
        *(["the test split"] if test else []),
        *([f"{', '.join(spec.tasks)} (limit {spec.limit})"] if spec.tasks else []),
    ]
    print(f"scoring the front: {plans} plans on {' and '.join(what)} ...", flush=True)
    texts = {"calibration": exp.calibration.source, "perplexity": exp.evaluation.source}
    for note in contamination_notes(spec.tasks, texts):
        print(f"  {note}", flush=True)


def _front_metrics(scores: dict) -> tuple[dict[str, float], list[str]]:
    """One plan's scores from `run_front_scores` as its run's metrics (test_*, lm_eval.<task>.<metric>, the mean
    accuracy and its standard error), with the parts of its printed line."""
    metrics = {f"test_{k}": v for k, v in (scores["test"] or {}).items()}
    parts = [f"test KL {metrics['test_kl']:.4f}, perplexity {metrics['test_perplexity']:.3f}"] if metrics else []
    tasks = scores["tasks"]
    if tasks:
        metrics.update({f"lm_eval.{t}.{m}": v for t, ms in tasks.items() for m, v in ms.items()})
        metrics[BENCH] = mean_accuracy(tasks)
        se = mean_accuracy_stderr(tasks)
        if se is not None:
            metrics[f"{BENCH}_stderr"] = se
        parts.append(
            f"mean accuracy {metrics[BENCH]:.3f} "
            f"({', '.join(f'{t} {mean_accuracy({t: ms}):.3f}' for t, ms in tasks.items())})"
        )
    return metrics, parts


def say_if_lm_eval_cannot_rank(front: list[dict], spec, tracker: SearchTracker) -> None:
    """A line when the front's lm-eval accuracies differ by less than their noise: they then rank nothing."""
    accs = []
    for r in front:
        acc, se = (tracker.metric(int(r["trial"]), k) for k in (BENCH, f"{BENCH}_stderr"))
        if acc is not None and se is not None:
            accs.append((acc, se))
    if accs and not ranks_plans(accs):
        lo, hi = min(a for a, _ in accs), max(a for a, _ in accs)
        se = max(s for _, s in accs)
        print(
            f"  note: the front's mean accuracies ({lo:.3f} to {hi:.3f}) differ by less than two standard errors "
            f"(each about {se:.3f}): at limit {spec.limit} lm-eval does not rank these plans; raise benchmark.limit "
            "or compare them by KL",
            flush=True,
        )


def write_front_scores(rows: list[dict], front: list[dict], tracker: SearchTracker, out: Path) -> None:
    """The front's test-split scores and benchmark, as its runs hold them, beside its proxies in trials.csv (the
    test split's) and pareto.csv (both)."""
    # Each front trial's scores read from MLflow once, for both tables.
    scores = {int(r["trial"]): {k: tracker.metric(int(r["trial"]), k) for k in (*TEST_COLUMNS, BENCH)} for r in front}
    for table, keys in ((rows, TEST_COLUMNS), (front, (*TEST_COLUMNS, BENCH))):
        for r in table:
            got = scores.get(int(r["trial"]), {})
            r.update({k: "" if got.get(k) is None else got[k] for k in keys})
    write_csv(out / "trials.csv", rows, COLUMNS)
    write_csv(out / "pareto.csv", front, [*COLUMNS, BENCH])
