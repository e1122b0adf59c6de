"""What a search leaves behind: trials.csv and pareto.csv, progress lines, the front's table and plots, and
the parent run's artifacts in MLflow. Rebuilt from the study at any time, so a resumed search writes
the same files as one that never stopped."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import TextIO

import optuna

from autosquash.search.experiment import Experiment
from autosquash.track.mlflow_store import SearchTracker
from autosquash.track.plots import front_html, front_png

# Columns of trials.csv and pareto.csv; `plan` is the trial's plan file, relative to the output folder.
COLUMNS = [
    "trial",
    "origin",
    "state",
    "perplexity",
    "kl",
    "memory_mb",
    "energy_mj_per_token",
    "tokens_per_s",
    "bits_per_weight",
    "block_bits_per_weight",
    "weights_mb",
    "fits",
    "trial_s",
    "plan",
    "error",
]
BENCH = "lm_eval_mean_acc"  # the front's lm-eval mean accuracy, a metric of its trial runs
OBJECTIVE_METRIC = {"perplexity": "perplexity", "kl": "kl", "memory": "memory_mb", "energy": "energy_mj_per_token"}


def metrics_row(result: dict[str, float]) -> dict[str, float]:
    """Derived metrics in the units trials.csv and the objectives use."""
    return {
        "memory_mb": result["peak_memory_bytes"] / 1e6,
        "weights_mb": result["weights_bytes"] / 1e6,
        "energy_mj_per_token": result["energy_j_per_token"] * 1e3,
        "tokens_per_s": result["decode_tokens_per_s"],
        "constraint_mb": (result["peak_memory_bytes"] - result["app_memory_limit_bytes"]) / 1e6,
    }


class Progress:
    """One line per finished trial, with the front's size and time per trial; the front itself (memory and
    perplexity of each plan) after each quarter of the trials."""

    def __init__(self, total: int, already_done: int, stream: TextIO = sys.stdout):
        self.total, self.already_done, self.stream, self.start = total, already_done, stream, time.perf_counter()
        self.marks = {self.total * k // 4 for k in (1, 2, 3)} - {0}

    def front(self, done: int, rows: list[dict], shown: int = 8) -> None:
        """At a quarter of the trials: the front so far, smallest plans first (the final table follows the end)."""
        if done not in self.marks or not rows:
            return
        self.marks.discard(done)
        points = [f"{float(r['memory_mb']):.1f} MB ppl {float(r['perplexity']):.2f}" for r in rows[:shown]]
        more = f", +{len(rows) - shown} more" if len(rows) > shown else ""
        print(f"  front after {done} trials: {'; '.join(points)}{more}", file=self.stream, flush=True)

    def trial(self, done: int, number: int, origin: str, metrics: dict | None, error: str | None, front: int) -> None:
        """One line for a finished trial: its metrics (or failure), the front's size, elapsed time and ETA."""
        elapsed = time.perf_counter() - self.start
        # Time per trial of this run only: a resumed search's earlier trials cost it nothing.
        eta = (self.total - done) * elapsed / max(done - self.already_done, 1)
        if metrics is None:
            what = f"FAILED: {error}"
        else:
            what = (
                f"ppl {metrics['perplexity']:8.2f}  kl {metrics['kl']:.4f}  mem {metrics['memory_mb']:7.1f} MB  "
                f"{metrics['energy_mj_per_token']:7.2f} mJ/tok  {metrics['trial_s']:5.1f} s"
            )
        print(
            f"[{done:3d}/{self.total}] trial {number:3d} {origin:8s} {what}  | front {front}  "
            f"| {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left",
            file=self.stream,
            flush=True,
        )


INTERRUPTED = "interrupted_trials"  # study user attribute: trials a stopped driver left running, asked again


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards the budget: completed or failed, not interrupted by a driver stop."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.number not in interrupted]


def write_tables(study: optuna.Study, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rewrite trials.csv and pareto.csv from the study; returns (rows, front rows).

    The front is Optuna's (`study.best_trials`): the non-dominated completed trials among those that fit
    the device (the memory constraint each trial sets); the others stay in trials.csv.
    """
    rows = [_row(t) for t in counted_trials(study)]
    front = [_row(t) for t in study.best_trials]
    front.sort(key=lambda r: float(r["memory_mb"]))
    write_csv(out_dir / "trials.csv", rows, COLUMNS)
    write_csv(out_dir / "pareto.csv", front, COLUMNS)
    return rows, front


def _row(t: optuna.trial.FrozenTrial) -> dict:
    row = {c: t.user_attrs.get(c, "") for c in COLUMNS}
    row.update(trial=t.number, state=t.state.name)
    return row


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Replace `path` atomically: a reader (or a crash) never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def print_front(front: list[dict], exp: Experiment, out: Path) -> None:
    """Print the Pareto front (smallest memory first) and the command that opens the MLflow UI."""
    print(f"\nPareto front of {exp.name}: {len(front)} plans ({', '.join(exp.objectives)} minimised)")
    print(
        f"{'trial':>5s} {'origin':8s} {'ppl':>9s} {'kl':>8s} {'memory MB':>10s} {'mJ/token':>9s} "
        f"{'tok/s':>7s} {'bits/w':>6s} {'lm-eval':>7s}  plan"
    )
    for r in front:
        acc = r.get("lm_eval_mean_acc")
        acc = None if acc in (None, "") else float(acc)  # rows read back from pareto.csv hold strings
        print(
            f"{r['trial']:>5} {r['origin']:8s} {float(r['perplexity']):9.3f} {float(r['kl']):8.4f} "
            f"{float(r['memory_mb']):10.1f} {float(r['energy_mj_per_token']):9.3f} "
            f"{float(r['tokens_per_s']):7.1f} {float(r['bits_per_weight']):6.2f} "
            f"{'-' if acc is None else f'{acc:.3f}':>7s}  {r['plan']}"
        )
    if exp.benchmark.tasks:
        print(f"lm-eval: mean accuracy on {', '.join(exp.benchmark.tasks)} (limit {exp.benchmark.limit})")
    print(f"\nAll trials: {out / 'trials.csv'}   front: {out / 'pareto.csv'}")
    print(f"Browse in MLflow: autosquash ui --out {out}   (then open http://127.0.0.1:5000)")


def write_plots_and_artifacts(
    rows: list[dict],
    front: list[dict],
    exp: Experiment,
    limit_mb: float,
    tracker: SearchTracker,
    out: Path,
    setup_s: float,
    driver_metrics: dict[str, float],
) -> None:
    """The front's plots, and the tables and plots on the MLflow parent run with the search's totals."""
    title = f"{exp.name}: {exp.quality_objective} against memory on {exp.device}"
    front_png(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.png")
    front_html(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.html")
    tracker.log_search_artifacts(
        [out / f for f in ("trials.csv", "pareto.csv", "pareto.png", "pareto.html")],
        {"trials_finished": len(rows), "front_size": len(front), "setup_s": setup_s, **driver_metrics},
    )
