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

from autosquash.compress.plan import Plan
from autosquash.models.arch import Arch
from autosquash.search.experiment import Experiment
from autosquash.track.layer_map import layer_map_html, layer_map_png
from autosquash.track.mlflow_store import SearchTracker
from autosquash.track.plots import front_html, front_png
from autosquash.yaml_io import load_yaml_model

# Columns of trials.csv and pareto.csv; `plan` is the trial's plan file, relative to the output folder.
COLUMNS = [
    "trial",
    "origin",
    "state",
    "perplexity",
    "kl",
    "test_perplexity",
    "test_kl",
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
# The front's scores on the test split (tokens the search did not select on), metrics of its trial runs; blank
# in trials.csv for plans off the front and for searches without a test split.
TEST_COLUMNS = ("test_perplexity", "test_kl")
OBJECTIVE_METRIC = {"perplexity": "perplexity", "kl": "kl", "memory": "memory_mb", "energy": "energy_mj_per_token"}

PEERS_FILE = "peers.csv"
PEER_COLUMNS = [
    "name",
    "file",
    "perplexity",
    "kl",
    "memory_mb",
    "energy_mj_per_token",
    "tokens_per_s",
    "bits_per_weight",
    "weights_mb",
    "fits",
]


def metrics_row(result: dict[str, float]) -> dict[str, float]:
    """Derived metrics in the units trials.csv and the objectives use."""
    return {
        "memory_mb": result["peak_memory_bytes"] / 1e6,
        "weights_mb": result["weights_bytes"] / 1e6,
        "energy_mj_per_token": result["energy_j_per_token"] * 1e3,
        "tokens_per_s": result["decode_tokens_per_s"],
        "constraint_mb": (result["peak_memory_bytes"] - result["app_memory_limit_bytes"]) / 1e6,
    }


def plan_kind(plan: Plan) -> str:
    """A plan in a word: its one GGUF type when every linear has it, unpruned and whole (the embeddings may
    differ, as in llama.cpp's recipes), else 'mixed'."""
    types = {c.quant for c in plan.groups.values()} or {"F16"}  # groups a plan leaves out stay F16
    plain = all(c == type(c)(quant=c.quant) for c in plan.groups.values())
    return types.pop() if plain and len(types) == 1 else "mixed"


def trial_run_name(number: int, plan: Plan, metrics: dict | None) -> str:
    """What a trial's MLflow run is called: `t12 mixed 93.0 MB kl 0.046` (`t12 mixed failed`)."""
    if metrics is None:
        return f"t{number} {plan_kind(plan)} failed"
    return f"t{number} {plan_kind(plan)} {float(metrics['weights_mb']):.1f} MB kl {float(metrics['kl']):.3g}"


class Progress:
    """One line per finished trial, with the front's size and time per trial; the front itself (memory and
    perplexity of each plan) after each quarter of the trials. On a terminal (or with `live=True`), a live
    panel under the lines as well (rich): trials done, failures, time per trial, time left and the best plan
    so far in each size band. A log file gets the plain lines only."""

    BANDS = 5  # size bands of the live panel, equal widths of weights MB between the smallest and largest plan

    def __init__(self, total: int, already_done: int, stream: TextIO | None = None, live: bool | None = None):
        stream = sys.stdout if stream is None else stream  # stdout now, not at import (a capture may have closed it)
        self.total, self.already_done, self.stream, self.start = total, already_done, stream, time.perf_counter()
        self.marks = {self.total * k // 4 for k in (1, 2, 3)} - {0}
        self.failures, self.done, self.rows = 0, already_done, []
        self.live = None
        if stream.isatty() if live is None else live:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._panel(), console=Console(file=stream), refresh_per_second=2, transient=True)
            self.live.start()

    def _print(self, line: str) -> None:
        if self.live is None:
            print(line, file=self.stream, flush=True)
        else:  # above the live panel, which stays at the bottom
            self.live.console.print(line, markup=False, highlight=False)

    def _eta(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start
        # Time per trial of this run only: a resumed search's earlier trials cost it nothing.
        per = elapsed / max(self.done - self.already_done, 1)
        return elapsed, (self.total - self.done) * per

    def _panel(self):
        from rich.table import Table

        elapsed, left = self._eta()
        per = elapsed / max(self.done - self.already_done, 1)
        t = Table(
            title=f"{self.done}/{self.total} trials, {self.failures} failed, {per:.0f} s per trial, "
            f"~{left / 60:.1f} min left",
            title_justify="left",
        )
        for head in ("weights MB", "best trial", "perplexity", "kl", "peak MB"):
            t.add_column(head, justify="right")
        for band, r in self.bands():
            if r is None:
                t.add_row(band, "-", "-", "-", "-")
            else:
                t.add_row(band, str(r["trial"]), f"{r['perplexity']:.2f}", f"{r['kl']:.4f}", f"{r['memory_mb']:.1f}")
        return t

    def bands(self) -> list[tuple[str, dict | None]]:
        """(band, the lowest-KL finished plan in it) for BANDS equal bands of weights MB over the plans so far."""
        if not self.rows:
            return []
        lo, hi = min(r["weights_mb"] for r in self.rows), max(r["weights_mb"] for r in self.rows)
        width = (hi - lo) / self.BANDS or 1.0
        out = []
        for b in range(self.BANDS if hi > lo else 1):
            a, z = lo + b * width, lo + (b + 1) * width
            inside = [
                r for r in self.rows if a <= r["weights_mb"] < z or (b == self.BANDS - 1 and r["weights_mb"] == z)
            ]
            out.append(
                (f"{a:.0f}-{z:.0f}" if hi > lo else f"{lo:.0f}", min(inside, key=lambda r: r["kl"], default=None))
            )
        return out

    def front(self, done: int, rows: list[dict], shown: int = 8) -> None:
        """At a quarter of the trials: the front so far, smallest plans first (the final table follows the end)."""
        if done not in self.marks or not rows:
            return
        self.marks.discard(done)
        points = [f"{float(r['memory_mb']):.1f} MB ppl {float(r['perplexity']):.2f}" for r in rows[:shown]]
        more = f", +{len(rows) - shown} more" if len(rows) > shown else ""
        self._print(f"  front after {done} trials: {'; '.join(points)}{more}")

    def trial(self, done: int, number: int, origin: str, metrics: dict | None, error: str | None, front: int) -> None:
        """One line for a finished trial: its metrics (or failure), the front's size, elapsed time and ETA."""
        self.done = done
        elapsed, eta = self._eta()
        if metrics is None:
            self.failures += 1
            what = f"FAILED: {error}"
        else:
            what = (
                f"ppl {metrics['perplexity']:8.2f}  kl {metrics['kl']:.4f}  mem {metrics['memory_mb']:7.1f} MB  "
                f"{metrics['energy_mj_per_token']:7.2f} mJ/tok  {metrics['trial_s']:5.1f} s"
            )
            if "weights_mb" in metrics:
                keys = ("perplexity", "kl", "memory_mb", "weights_mb")
                self.rows.append({"trial": number, **{k: float(metrics[k]) for k in keys}})
        self._print(
            f"[{done:3d}/{self.total}] trial {number:3d} {origin:8s} {what}  | front {front}  "
            f"| {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left"
        )
        if self.live is not None:
            self.live.update(self._panel())

    def close(self) -> None:
        """Take the live panel down (the plain lines stay)."""
        if self.live is not None:
            self.live.stop()
            self.live = None


INTERRUPTED = "interrupted_trials"  # study user attribute: trials a stopped driver left running, asked again


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards the budget: completed or failed, not interrupted by a driver stop."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.number not in interrupted]


def write_tables(study: optuna.Study, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rewrite trials.csv and pareto.csv from the study; returns (rows, front rows).

    The front is Optuna's (`study.best_trials`): the non-dominated completed trials among those that fit
    the phone (the memory constraint each trial sets); the others stay in trials.csv.
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
        f"{'trial':>5s} {'origin':8s} {'ppl':>9s} {'kl':>8s} {'test ppl':>9s} {'test kl':>8s} {'memory MB':>10s} "
        f"{'mJ/token':>9s} {'tok/s':>7s} {'bits/w':>6s} {'lm-eval':>7s}  plan"
    )

    def number(r: dict, key: str, fmt: str, width: int) -> str:
        v = r.get(key)  # rows read back from pareto.csv hold strings; "" where a score is missing
        return f"{'-' if v in (None, '') else format(float(v), fmt):>{width}s}"

    for r in front:
        print(
            f"{r['trial']:>5} {r['origin']:8s} {float(r['perplexity']):9.3f} {float(r['kl']):8.4f} "
            f"{number(r, 'test_perplexity', '.3f', 9)} {number(r, 'test_kl', '.4f', 8)} "
            f"{float(r['memory_mb']):10.1f} {float(r['energy_mj_per_token']):9.3f} "
            f"{float(r['tokens_per_s']):7.1f} {float(r['bits_per_weight']):6.2f} "
            f"{number(r, 'lm_eval_mean_acc', '.3f', 7)}  {r['plan']}"
        )
    if any(r.get("test_kl") not in (None, "") for r in front):
        print("ppl, kl: the evaluation set the search selected on; test ppl, test kl: held-out tokens it did not")
    if exp.benchmark.tasks:
        print(f"lm-eval: mean accuracy on {', '.join(exp.benchmark.tasks)} (limit {exp.benchmark.limit})")
    print(f"\nAll trials: {out / 'trials.csv'}   front: {out / 'pareto.csv'}")
    print(f"Browse in MLflow: autosquash ui --out {out}   (it prints the page to open)")


def write_plots_and_artifacts(
    rows: list[dict],
    front: list[dict],
    exp: Experiment,
    limit_mb: float,
    tracker: SearchTracker,
    out: Path,
    setup_s: float,
    driver_metrics: dict[str, float],
    arch: Arch,
) -> None:
    """The front's plots, each front plan's layer map (on its trial's run), and on the MLflow parent run the
    tables, plots, the search's totals and a description of the front."""
    write_front_plots(rows, front, exp, limit_mb, out)
    for r in front:
        for f in write_layer_maps(arch, int(r["trial"]), out):
            tracker.log_trial_artifact(int(r["trial"]), f)
    tracker.log_search_artifacts(
        [out / f for f in ("trials.csv", "pareto.csv", "pareto.png", "pareto.html")],
        {"trials_finished": len(rows), "front_size": len(front), "setup_s": setup_s, **driver_metrics},
    )
    tracker.describe_search(front_markdown(front, exp, out), front)


def write_front_plots(rows: list[dict], front: list[dict], exp: Experiment, limit_mb: float, out: Path) -> None:
    """pareto.png and pareto.html in `out`, with the peer files of its peers.csv where there is one."""
    title = f"{exp.name}: {exp.quality_objective} against size on {exp.phone}"
    peers = read_peers(out)
    front_png(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.png", peers)
    front_html(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.html", peers)


# The front as a table (the search run's description, `autosquash report`): (column, heading, format).
FRONT_TABLE = (
    ("trial", "trial", "{}"),
    ("origin", "origin", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("kl", "KL", "{:.4f}"),
    ("test_perplexity", "test perplexity", "{:.3f}"),
    ("test_kl", "test KL", "{:.4f}"),
    ("weights_mb", "weights MB", "{:.1f}"),
    ("memory_mb", "peak MB", "{:.1f}"),
    ("energy_mj_per_token", "mJ/token", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.1f}"),
    ("bits_per_weight", "bits/weight", "{:.2f}"),
)


def table_cell(fmt: str, v) -> str:
    """`v` in `fmt` ("{}": as it is), "-" where a number is missing."""
    try:
        return fmt.format(float(v)) if fmt != "{}" else str(v)
    except (TypeError, ValueError):
        return "-"


def write_layer_maps(arch: Arch, trial: int, out: Path) -> list[Path]:
    """layers/trial-NNNN.png and .html: where trial `trial`'s plan put its bits."""
    plan = load_yaml_model(Plan, out / "plans" / f"trial-{trial:04d}.yaml")
    (out / "layers").mkdir(exist_ok=True)
    png, page = out / "layers" / f"trial-{trial:04d}.png", out / "layers" / f"trial-{trial:04d}.html"
    title = f"trial {trial}: bits per weight by block and linear"
    layer_map_png(arch, plan, title, png)
    layer_map_html(arch, plan, title, page)
    return [png, page]


def front_markdown(front: list[dict], exp: Experiment, out: Path) -> str:
    """The parent run's description: the front as a table, the phone, and how to take a plan out."""
    lines = [
        f"**{exp.name}**: {exp.model} on **{exp.phone}**, {len(front)} plans on the Pareto front "
        f"({', '.join(exp.objectives)} minimised).",
        "",
        "| " + " | ".join(h for _, h, _ in FRONT_TABLE) + " |",
        "|" + "|".join("---" if k == "origin" else "---:" for k, _, _ in FRONT_TABLE) + "|",
    ]
    for r in front:
        lines.append("| " + " | ".join(table_cell(f, r.get(k)) for k, _, f in FRONT_TABLE) + " |")
    lines += [
        "",
        "Export a plan as GGUF (rebuilt and healed as its trial was), then run it in llama.cpp:",
        "",
        f"    autosquash export --run {out} --trial N --out model.gguf",
        "    llama-cli -m model.gguf -p 'Hello'    # add --lora model.lora.gguf where export wrote an adapter",
        "",
        f"Per-plan layer maps: the `layers/` artifacts of each front trial; a full report: `autosquash report {out}`.",
    ]
    return "\n".join(lines)


def read_peers(run: Path) -> list[dict]:
    """The peers.csv rows of the search in `run` (none when the peer benchmark has not run)."""
    path = run / PEERS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
