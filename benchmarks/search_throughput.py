"""Trials per hour with 1 and 2 workers on the smoke experiment, and what a trial spends outside
evaluation, side by side in one process.

    .venv/bin/python benchmarks/search_throughput.py [--trials 8] [--experiment experiments/smoke.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from autosquash.search.experiment import BenchmarkSpec, load_experiment
from autosquash.search.study import SearchOptions, run_search
from autosquash.track.mlflow_store import default_tracking_uri

PARTS = ("build_s", "heal_s", "eval_s", "trial_s")


def measure(experiment: str, trials: int, workers: int, out: Path) -> dict[str, float]:
    # Trials only: the front's lm-eval benchmark runs once after them and is not a per-trial cost.
    exp = load_experiment(experiment).model_copy(update={"benchmark": BenchmarkSpec()})
    start = time.perf_counter()
    run_search(exp, SearchOptions(out_dir=out, trials=trials, workers=workers))
    wall = time.perf_counter() - start
    client = MlflowClient(default_tracking_uri(out))
    runs = client.search_runs(
        [client.get_experiment_by_name(exp.name).experiment_id],
        "tags.`autosquash.role` = 'trial' and attributes.status = 'FINISHED'",
    )
    parent = client.search_runs(
        [client.get_experiment_by_name(exp.name).experiment_id], "tags.`autosquash.role` = 'search'"
    )[0]
    setup = parent.data.metrics["setup_s"]
    parts = {p: statistics.mean(r.data.metrics[p] for r in runs) for p in PARTS}
    hits = sum(r.data.metrics.get("cache_hits", 0) for r in runs)
    # Worker-seconds per trial after set-up, less what the trial itself measured inside its worker:
    # scheduling, shipping results, Optuna and MLflow bookkeeping, idle workers.
    overhead = (wall - setup) * workers / trials - parts["trial_s"]
    trials_per_h = 3600 * trials / (wall - setup)
    return {
        "wall_s": wall,
        "setup_s": setup,
        "trials_per_h": trials_per_h,
        "overhead_s": overhead,
        "cache_hits": hits,
        **parts,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/smoke.yaml")
    p.add_argument("--trials", type=int, default=8)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        measure(args.experiment, 2, 2, Path(tmp) / "warm-up")  # imports, file caches, first Ray start
        for workers in (1, 2):
            results[workers] = measure(args.experiment, args.trials, workers, Path(tmp) / f"w{workers}")
    keys = ["wall_s", "setup_s", "trials_per_h", *PARTS, "overhead_s", "cache_hits"]
    print(f"\n{args.trials} trials of {args.experiment}")
    print(f"{'':14s}" + "".join(f"{k:>13s}" for k in keys))
    for w, r in results.items():
        print(f"{w} worker(s)    " + "".join(f"{r[k]:13.2f}" for k in keys))
    print(
        f"trials per hour after set-up, 2 vs 1 workers: {results[2]['trials_per_h'] / results[1]['trials_per_h']:.2f}x"
        f"; wall time {results[1]['wall_s'] / results[2]['wall_s']:.2f}x (set-up, paid once per search: model"
        " loading, calibration, Ray start)"
    )


if __name__ == "__main__":
    main()
