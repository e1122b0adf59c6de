"""The search driver: ask/tell with K trials in flight on Ray, every result stored before the next ask.

Optuna's storage is the source of truth: trials.csv, pareto.csv and the MLflow tags are rebuilt from
it, so a driver killed at any point resumes with `--resume` and loses no finished trial.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
import torch

from autosquash.compress.calibrate import Stats, cached_stats
from autosquash.compress.plan import Plan
from autosquash.cost import load_device
from autosquash.errors import AutosquashError
from autosquash.evaluate.benchmark import mean_accuracy
from autosquash.evaluate.heal import HealConfig
from autosquash.evaluate.proxy import reference
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.models.arch import Arch
from autosquash.models.load import load_model, load_tokenizer, resolve
from autosquash.search.experiment import Experiment, TextSpec
from autosquash.search.front import pareto_indices
from autosquash.search.runner import TrialContext, run_benchmark, run_trial
from autosquash.search.sensitivity import SensitivitySampler, cached_profile, proposal_targets
from autosquash.search.space import SearchSpace
from autosquash.track.mlflow_store import ORIGIN, SearchTracker, default_tracking_uri
from autosquash.track.plots import front_html, front_png
from autosquash.yaml_io import dump_yaml_model, load_yaml_model

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


@dataclass(frozen=True)
class SearchOptions:
    """Run-time options of one search (the experiment file holds the configuration)."""

    out_dir: Path
    trials: int
    workers: int
    ray_address: str | None = None
    resume: bool = False
    tracking_uri: str | None = None
    storage: str | None = None


def make_sampler(exp: Experiment, budget: int) -> optuna.samplers.BaseSampler:
    """The experiment's sampler, sized for a search of `budget` trials; each honours the device-fit
    constraint set on its trials.

    Optuna's defaults (TPE: 10 random start-up trials; NSGA-II: generations of 50) assume hundreds of
    trials: at a phone search's few dozen, NSGA-II would never leave its random first generation. So the
    start-up and the generation are a quarter of the budget (TPE 4..10 trials, NSGA-II 4..50 plans).
    `sensitivity` needs the base model: the study starts with TPE and `sensitivity_sampler` replaces it
    once the inputs are loaded.
    """
    quarter = max(4, budget // 4)
    if exp.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=min(50, quarter), seed=exp.seed)
    if exp.sampler == "random":
        return optuna.samplers.RandomSampler(seed=exp.seed)
    startup = min(10, quarter)
    if exp.sampler == "gp":
        return optuna.samplers.GPSampler(seed=exp.seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=exp.seed, multivariate=True, n_startup_trials=startup)


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

    def trial(self, done: int, number: int, origin: str, metrics: dict | None, error: str | None, front: int):
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


def _read_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) or t.user_attrs.get(
            "interrupted"
        ):
            continue
        row = {c: t.user_attrs.get(c, "") for c in COLUMNS}
        row.update(trial=t.number, state=t.state.name)
        rows.append(row)
    return rows


def write_tables(study: optuna.Study, exp: Experiment, out_dir: Path) -> tuple[list[dict], list[dict]]:
    """Rewrite trials.csv and pareto.csv from the study; returns (rows, front rows)."""
    rows = _read_rows(study)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    points = [[float(r[OBJECTIVE_METRIC[o]]) for o in exp.objectives] for r in done]
    front = [done[i] for i in pareto_indices(points, [bool(r["fits"]) for r in done])]
    front.sort(key=lambda r: float(r["memory_mb"]))
    _write_csv(out_dir / "trials.csv", rows, COLUMNS)
    _write_csv(out_dir / "pareto.csv", front, COLUMNS)
    return rows, front


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Replace `path` atomically: a reader (or a crash) never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


@dataclass
class SearchInputs:
    """What a search computes once before its trials: base model, token sets, calibration statistics."""

    spec: str
    base: torch.nn.Module
    tokenizer: Any
    arch: Arch
    calib: torch.Tensor
    held_out: torch.Tensor
    stats: Stats


def load_inputs(exp: Experiment, out_dir: Path) -> SearchInputs:
    """Load the base model and tokenizer, cut the token sets, and get the (disk-cached) statistics."""
    print(f"loading {exp.model} ...", flush=True)
    base = load_model(exp.model, seed=exp.seed)
    tok = load_tokenizer(exp.model)
    calib = text_batch(tok, exp.calibration)
    held_out = text_batch(tok, exp.evaluation)
    print(f"calibrating on {calib.numel()} tokens, held-out set {held_out.numel()} tokens ...", flush=True)
    stats = cached_stats(base, calib, resolve(exp.model).key, out_dir / "cache")
    return SearchInputs(exp.model, base, tok, Arch.from_config(base.config), calib, held_out, stats)


def text_batch(tokenizer, spec: TextSpec) -> torch.Tensor:
    """The token batch a text spec names."""
    return token_block(tokenizer, load_texts(spec.source), spec.tokens, spec.seq_len)


def prepare_context(exp: Experiment, inputs: SearchInputs, workers: int) -> TrialContext:
    """What every trial of `exp` reads (base model, reference logits, device, healing); also what an
    export or a benchmark needs to rebuild a trial exactly as the search ran it."""
    return TrialContext(
        base=inputs.base,
        arch=inputs.arch,
        stats=inputs.stats,
        calib_ref=reference(inputs.base, inputs.calib, exp.topk),
        eval_ref=reference(inputs.base, inputs.held_out, exp.topk),
        device=load_device(exp.device),
        heal=HealConfig(**exp.heal.model_dump()),
        context_tokens=exp.context_tokens,
        threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
        tokenizer=inputs.tokenizer,
    )


def run_search(exp: Experiment, opts: SearchOptions) -> list[dict]:
    """Run (or resume) a search; returns the Pareto front rows."""
    import ray

    started = time.perf_counter()
    out = opts.out_dir
    if out.exists() and (out / "optuna.db").exists() and not opts.resume:
        raise AutosquashError(f"{out} already holds a search; pass --resume to continue it or choose another --out")
    (out / "plans").mkdir(parents=True, exist_ok=True)
    space = SearchSpace.load(exp.search_space)
    dump_yaml_model(exp, out / "experiment.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = opts.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study = optuna.create_study(
        study_name=exp.name,
        storage=storage,
        load_if_exists=opts.resume,
        directions=["minimize"] * len(exp.objectives),
        sampler=make_sampler(exp, opts.trials),
    )
    tracking_uri = opts.tracking_uri or default_tracking_uri(out)
    (out / "tracking_uri.txt").write_text(tracking_uri + "\n")  # where export/register find this search's runs
    tracker = SearchTracker(tracking_uri, exp.name, out / "mlartifacts")
    parent = tracker.start(
        study.user_attrs.get("mlflow_parent_run_id"),
        f"search-{exp.name}",
        {
            "model": exp.model,
            "device": exp.device,
            "search_space": space.name,
            "target": space.target,
            "objectives": ",".join(exp.objectives),
            "sampler": exp.sampler,
            "trials": opts.trials,
            "workers": opts.workers,
        },
    )
    study.set_user_attr("mlflow_parent_run_id", parent)
    _recover_stale(study, exp, tracker)
    ctx = prepare_context(exp, load_inputs(exp, out), opts.workers)
    if not study.user_attrs.get("baselines_enqueued"):
        for quant in space.baselines:
            study.enqueue_trial(space.baseline_params(ctx.arch, quant), user_attrs={"origin": "baseline"})
        study.set_user_attr("baselines_enqueued", True)
    if exp.sampler == "sensitivity":
        study.sampler = sensitivity_sampler(exp, space, ctx, out)

    if ray.is_initialized():
        ray.shutdown()
    # Ray's token authentication stays on (safe by default); its notice saying so is not news to a user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if opts.ray_address:
        ray.init(address=opts.ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=opts.workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        ctx_box = [ray.put(ctx)]
        setup_s = _loop(study, space, exp, ctx, ctx_box, tracker, opts, started)
        rows, front = write_tables(study, exp, out)
        if exp.benchmark.tasks:
            _benchmark_front(front, exp, ctx_box, tracker, out)
            for r in front:  # the front's benchmark beside its proxies, in pareto.csv too
                r[BENCH] = tracker.metric(int(r["trial"]), BENCH)
            _write_csv(out / "pareto.csv", front, [*COLUMNS, BENCH])
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    finally:
        ray.shutdown()
    tracker.mark_front({int(r["trial"]) for r in front})
    title = f"{exp.name}: {exp.quality_objective} against memory on {exp.device}"
    limit_mb = ctx.device.app_memory_fraction * ctx.device.dram_bytes / 1e6
    front_png(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.png")
    front_html(rows, front, exp.quality_objective, limit_mb, title, out / "pareto.html")
    tracker.log_search_artifacts(
        [out / f for f in ("trials.csv", "pareto.csv", "pareto.png", "pareto.html")],
        {"trials_finished": len(rows), "front_size": len(front), "setup_s": setup_s},
    )
    tracker.finish()
    return front


def sensitivity_sampler(exp: Experiment, space: SearchSpace, ctx: TrialContext, out: Path) -> SensitivitySampler:
    """The per-group damage model (measured once, cached on disk) and a sampler proposing from it."""
    profile = cached_profile(
        ctx.base, ctx.arch, space, ctx.stats, ctx.calib_ref, exp.context_tokens, resolve(exp.model).key, out / "cache"
    )
    sizes = [profile.size(*profile.picks_of(space.baseline_params(ctx.arch, b))) for b in space.baselines]
    return SensitivitySampler(profile, proposal_targets(profile, sizes), seed=exp.seed)


def _finished(study: optuna.Study) -> int:
    """Trials that count towards the budget: completed or failed, not interrupted by a driver stop."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def _recover_stale(study: optuna.Study, exp: Experiment, tracker: SearchTracker) -> None:
    """Settle trials a killed driver left RUNNING.

    A trial whose result was already stored (it is in MLflow) is told with that result; one that was
    still running is marked interrupted and its plan asked again.
    """
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number in tracker.trial_runs and "error" not in t.user_attrs:
            study.tell(t.number, [float(t.user_attrs[OBJECTIVE_METRIC[o]]) for o in exp.objectives])
        elif t.number in tracker.trial_runs:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        else:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"origin": t.user_attrs.get("origin", "sampled")})


def _loop(
    study,
    space: SearchSpace,
    exp: Experiment,
    ctx: TrialContext,
    ctx_box: list,
    tracker: SearchTracker,
    opts: SearchOptions,
    started: float,
) -> float:
    """Keep `opts.workers` trials in flight until the budget is spent; returns the set-up time (s)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)(run_trial)
    setup_s = time.perf_counter() - started
    print(
        f"ready after {setup_s:.0f} s; {opts.trials - _finished(study)} trials to run on {opts.workers} workers",
        flush=True,
    )
    progress = Progress(opts.trials, _finished(study))
    pending: dict = {}
    while _finished(study) + len(pending) < opts.trials or pending:
        while len(pending) < opts.workers and _finished(study) + len(pending) < opts.trials:
            trial = study.ask()
            plan = space.sample(trial, ctx.arch)
            plan_rel = f"plans/trial-{trial.number:04d}.yaml"
            dump_yaml_model(plan, opts.out_dir / plan_rel)
            trial.set_user_attr("plan", plan_rel)
            # A sampler may name the origin as the trial starts (after `trial.user_attrs` was read).
            origin = study._storage.get_trial(trial._trial_id).user_attrs.get("origin", "sampled")
            trial.set_user_attr("origin", origin)
            pending[task.remote(ctx_box, plan.model_dump(mode="json"), exp.seed + trial.number)] = (trial, plan)
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        trial, plan = pending.pop(ref)
        try:
            raw, worker = ray.get(ref)
            # The worker's torch threads: SVD/Kronecker factors depend on them, so an export rebuilds with them.
            metrics, error = {**raw, **metrics_row(raw), "torch_threads": ctx.threads_per_worker}, None
            trial.set_user_attr("worker", worker)
        except Exception as e:  # a raising trial is a failed trial, recorded with its reason
            metrics, error = None, _reason(e)
        _record(study, trial, plan, metrics, error, exp, tracker, opts.out_dir)
        _, front = write_tables(study, exp, opts.out_dir)
        progress.trial(_finished(study), trial.number, trial.user_attrs["origin"], metrics, error, len(front))
        progress.front(_finished(study), front)
    return setup_s


def _benchmark_front(front: list[dict], exp: Experiment, ctx_box: list, tracker: SearchTracker, out: Path) -> None:
    """lm-eval on every front plan, in parallel on the workers, logged beside each trial's proxies.

    A plan is rebuilt exactly as its trial built it (same plan, same healing seed). Front plans that
    already carry scores (a resumed search) are not run again.
    """
    import ray

    spec = exp.benchmark
    todo = [r for r in front if tracker.metric(int(r["trial"]), BENCH) is None]
    print(f"benchmarking the front: {len(todo)} plans on {', '.join(spec.tasks)} (limit {spec.limit}) ...", flush=True)
    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)(run_benchmark)
    refs = {}
    for r in todo:
        plan = load_yaml_model(Plan, out / r["plan"])
        refs[task.remote(ctx_box, plan.model_dump(mode="json"), exp.seed + int(r["trial"]), spec.tasks, spec.limit)] = r
    while refs:
        (ref,), _ = ray.wait(list(refs), num_returns=1)
        row = refs.pop(ref)
        try:
            scores = ray.get(ref)
        except Exception as e:  # a benchmark that fails leaves the trial's proxies as they are
            print(f"  trial {row['trial']}: benchmark failed: {_reason(e)}", flush=True)
            continue
        metrics = {f"lm_eval.{t}.{m}": v for t, ms in scores.items() for m, v in ms.items()}
        metrics[BENCH] = mean_accuracy(scores)
        tracker.log_metrics(int(row["trial"]), metrics)
        print(
            f"  trial {row['trial']:>4}: mean accuracy {metrics[BENCH]:.3f}  "
            f"({', '.join(f'{t} {mean_accuracy({t: ms}):.3f}' for t, ms in scores.items())})",
            flush=True,
        )


def _reason(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"[:300]


def _record(study, trial, plan: Plan, metrics, error, exp: Experiment, tracker: SearchTracker, out: Path) -> None:
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
    tags = {ORIGIN: origin, "autosquash.worker": trial.user_attrs["worker"]}
    tracker.log_trial(trial.number, plan.flat_params(), metrics, tags, out / trial.user_attrs["plan"], failed=False)
    values = [float(metrics[OBJECTIVE_METRIC[o]]) for o in exp.objectives]
    if not all(math.isfinite(v) for v in values):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, values)
