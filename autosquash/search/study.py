"""The study: a search from its checked inputs to its front, with the samplers, the baselines' layers made
before the trials, and the ask/tell loop with K trials in flight on Ray, every result stored before the next ask.

Optuna's storage is the source of truth: trials.csv, pareto.csv and the MLflow tags are rebuilt from
it (search/outputs.py), so a driver killed at any point resumes with `--resume` and loses no finished
trial. What is stored and how a search resumes is search/record.py; what one trial does is search/trial.py;
the front's scores to report, search/front_scores.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from autosquash.compress.apply import VariantCache, make_variants
from autosquash.cost.model import compute_buffer_bytes, kv_cells, output_buffer_bytes
from autosquash.errors import AutosquashError, on_sigterm
from autosquash.export.gguf_file import check_writable
from autosquash.files import write_text
from autosquash.models.device import check_host_memory, driver_device, peak_rss_bytes, resolve_device
from autosquash.models.load import ResolvedModel, resolve_model
from autosquash.models.ship import Shipped
from autosquash.search.experiment import Experiment
from autosquash.search.front_scores import score_front, write_front_scores
from autosquash.search.outputs import Progress, metrics_row, write_plots_and_artifacts, write_tables
from autosquash.search.preflight import (
    check_ray_address,
    check_storage,
    check_tracking_uri,
    optuna_storage,
    stored_trials,
)
from autosquash.search.record import (
    ask_new,
    check_same_experiment,
    failure_reason,
    finished,
    plan_rel,
    record,
    recover_stale,
    warn_forced,
)
from autosquash.search.samplers import make_sampler, sensitivity_sampler
from autosquash.search.sensitivity import SensitivitySampler
from autosquash.search.space import SearchSpace
from autosquash.search.trial import (
    TrialContext,
    load_inputs,
    open_store,
    prepare_context,
    run_trial,
    trial_seed,
)
from autosquash.track.mlflow_store import SearchTracker, TokenSet, default_tracking_uri
from autosquash.yaml_io import dump_yaml_model


@dataclass(frozen=True)
class SearchOptions:
    """Run-time options of one search (the experiment file holds the configuration)."""

    out_dir: Path
    trials: int
    workers: int
    ray_address: str | None = None
    resume: bool = False
    force: bool = False  # resume although the experiment or search space changed (named in a warning)
    tracking_uri: str | None = None
    storage: str | None = None


@dataclass(frozen=True)
class _OpenSearch:
    """A search under way: its inputs, its Optuna study and its MLflow run, open until the search ends."""

    exp: Experiment
    opts: SearchOptions
    study: optuna.Study
    space: SearchSpace
    tracker: SearchTracker
    started: float  # time.perf_counter() when run_search began: the set-up time counts from it
    model: ResolvedModel  # exp.model, resolved once by the preflight


def run_search(exp: Experiment, opts: SearchOptions) -> list[dict]:
    """Run (or resume) a search; returns the Pareto front rows."""
    started = time.perf_counter()
    # Nothing written, nothing loaded yet: a bad input costs seconds and leaves no trace.
    device, model = _preflight(exp, opts)
    study, space = _open_study(exp, opts)
    tracker = _start_tracking(exp, opts, study, space)
    try:
        return _search(_OpenSearch(exp, opts, study, space, tracker, started, model), device)
    except KeyboardInterrupt:
        _mark(tracker, "KILLED")
        raise
    except BaseException:
        _mark(tracker, "FAILED")  # the MLflow UI shows the run as failed, not as running for ever
        raise


def _open_study(exp: Experiment, opts: SearchOptions) -> tuple[optuna.Study, SearchSpace]:
    """The search's Optuna study in `opts.out_dir`, new or resumed (refused where the experiment or its search
    space changed since, unless `opts.force`), with the search space."""
    out = opts.out_dir
    held = stored_trials(out)
    if held and not opts.resume:
        raise AutosquashError(f"{out} already holds a search; pass --resume to continue it or choose another --out")
    if opts.resume and not opts.storage and not held:
        raise AutosquashError(
            f"--resume: {out} holds no search to continue (no trial stored); drop --resume to start one"
        )
    if held == 0:
        (out / "optuna.db").unlink()  # what a start that failed before its first trial left: nothing to keep
    changed = check_same_experiment(exp, out, opts.force) if opts.resume else []
    (out / "plans").mkdir(parents=True, exist_ok=True)
    space = SearchSpace.load(exp.search_space)
    dump_yaml_model(exp, out / "experiment.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = opts.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study = optuna.create_study(
        study_name=exp.name,
        storage=optuna_storage(storage),
        load_if_exists=opts.resume,
        directions=["minimize"] * len(exp.objectives),
        sampler=make_sampler(exp, opts.trials),
    )
    space_digest = hashlib.sha256(Path(exp.search_space).read_bytes()).hexdigest()
    if study.user_attrs.get("search_space_sha256", space_digest) != space_digest:
        if not opts.force:
            raise AutosquashError(
                f"--resume: {exp.search_space} changed since {out} was searched with it; a search's trials come "
                "from one space: restore the file, start a new --out, or pass --force to mix them"
            )
        changed.append("search space")
    if changed:
        warn_forced(out, changed)
        study.set_user_attr("forced_changes", [*study.user_attrs.get("forced_changes", []), changed])
    study.set_user_attr("search_space_sha256", space_digest)
    return study, space


def _start_tracking(exp: Experiment, opts: SearchOptions, study: optuna.Study, space: SearchSpace) -> SearchTracker:
    """The search's MLflow parent run, started or (on resume) reopened, its id kept in the study."""
    out = opts.out_dir
    tracking_uri = opts.tracking_uri or default_tracking_uri(out)
    write_text(out / "tracking_uri.txt", tracking_uri + "\n")  # where export/register find this search's runs
    tracker = SearchTracker(tracking_uri, exp.name, out / "mlartifacts")
    parent = tracker.start(
        study.user_attrs.get("mlflow_parent_run_id"),
        f"search-{exp.name}",
        {
            "model": exp.model,
            "phone": exp.phone,
            "search_space": space.name,
            "target": space.target,
            "objectives": ",".join(exp.objectives),
            "sampler": exp.sampler,
            "trials": opts.trials,
            "workers": opts.workers,
        },
    )
    study.set_user_attr("mlflow_parent_run_id", parent)
    return tracker


def _mark(tracker: SearchTracker, status: str) -> None:
    """End the search's MLflow run as `status` if its store still takes writes (a full disk may be why the
    search stops: that error, not this one, is the one to report)."""
    logging.disable(logging.CRITICAL)  # MLflow's store logs a failed write with a traceback
    try:
        tracker.finish(status)
    except Exception as e:  # noqa: BLE001 - MLflow and its database raise many kinds
        while e.__cause__ is not None:
            e = e.__cause__
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        logging.disable(logging.NOTSET)
        logging.getLogger(__name__).debug("could not mark the search's MLflow run %s: %s", status, why)
    finally:
        logging.disable(logging.NOTSET)


def _preflight(exp: Experiment, opts: SearchOptions) -> tuple[torch.device, ResolvedModel]:
    """Everything a search can check before it writes or loads anything (see search/preflight.py); the device
    the driver computes its own share on (loading, calibration, references), and the model, resolved once.

    Without a cluster the trials run on this machine: a device it lacks is refused here. On a cluster each
    worker resolves the experiment's device on its own node, and the driver takes what this machine has.
    """
    from autosquash.cost import load_phone

    device = driver_device(exp.hardware.device) if opts.ray_address else resolve_device(exp.hardware.device)
    model = resolve_model(exp.model)
    arch = model.arch  # the model reference: its config alone, no weights
    check_host_memory(arch, exp.model)  # before a folder is made, not minutes into loading
    phone = load_phone(exp.phone)
    space = SearchSpace.load(exp.search_space)
    if space.target == "gguf":
        check_writable(arch, space.pruned())  # a front no GGUF file of this family could hold
    cells = kv_cells(exp.context_tokens)
    runtime = phone.runtime_fixed_bytes + output_buffer_bytes(arch)
    runtime += compute_buffer_bytes(arch, cells, phone.ubatch_tokens, phone.flash_attention)
    if runtime >= phone.app_memory_limit_bytes:
        raise AutosquashError(
            f"{exp.phone} cannot hold this model at any size: llama.cpp's runtime buffers alone take "
            f"{runtime / 1e6:.0f} MB at {exp.context_tokens} tokens of context, the app may hold "
            f"{phone.app_memory_limit_bytes / 1e6:.0f} MB"
        )
    if opts.ray_address:
        check_ray_address(opts.ray_address)
    if opts.tracking_uri:
        check_tracking_uri(opts.tracking_uri)
    if opts.storage:
        check_storage(opts.storage)
    return device, model


def _search(search: _OpenSearch, device: torch.device) -> list[dict]:
    """The search from its inputs to its front, in an MLflow run that is open (run_search closes it)."""
    import ray

    ctx, once = _prepare(search, device)
    _start_ray(search.opts)
    out = search.opts.out_dir
    try:
        resources = _trial_resources(search.exp)
        ctx.base.to("cpu")  # shipped on the CPU: each worker moves it to its own device once
        # As numpy arrays: the object store keeps one copy per node, which its CPU workers share.
        ctx_box = [ray.put(dataclasses.replace(ctx, base=Shipped(ctx.base)))]
        # From here the object store holds the base model for the workers; the driver needs no copy of it.
        ctx = dataclasses.replace(ctx, base=None)
        setup_s = _loop(search, ctx, ctx_box, resources)
        rows, front = write_tables(search.study, out)
        if search.exp.benchmark.tasks or ctx.test_ref is not None:
            score_front(front, search.exp, ctx_box, search.tracker, out, ctx.test_ref is not None, resources)
            write_front_scores(rows, front, search.tracker, out)
    finally:
        ray.shutdown()
    search.tracker.mark_front({int(r["trial"]) for r in front})
    limit_mb = ctx.phone.app_memory_limit_bytes / 1e6
    driver = {**once, "peak_driver_rss_bytes": peak_rss_bytes()}
    write_plots_and_artifacts(rows, front, search.exp, limit_mb, search.tracker, out, setup_s, driver, ctx.arch)
    search.tracker.finish()
    return front


def _prepare(search: _OpenSearch, device: torch.device) -> tuple[TrialContext, dict[str, float]]:
    """What every trial shares, made once in the driver: the inputs and references, the baselines' layers and
    the sampler; with the time each took (s)."""
    exp, study, space, opts = search.exp, search.study, search.space, search.opts
    out = opts.out_dir
    resumed = len(study.trials)  # 0 for a new search: its samplers keep the experiment's seed
    if resumed:
        study.sampler = make_sampler(exp, opts.trials, offset=resumed)
    recover_stale(study, exp, search.tracker, out)
    inputs = load_inputs(exp, out, device, search.model)
    search.tracker.token_sets(
        [
            TokenSet(exp.calibration.source, "calibration", inputs.calib.tolist()),
            TokenSet(exp.evaluation.source, "evaluation", inputs.held_out.tolist()),
        ]
    )
    t0 = time.perf_counter()
    ctx = prepare_context(exp, inputs, opts.workers)
    once = {"load_s": inputs.load_s, "calibration_s": inputs.calibration_s, "reference_s": time.perf_counter() - t0}
    del inputs  # the context holds what the trials need
    if not study.user_attrs.get("baselines_enqueued"):
        for quant in space.baselines:
            study.enqueue_trial(space.baseline_params(ctx.arch, quant), user_attrs={"origin": "baseline"})
        study.set_user_attr("baselines_enqueued", True)
    t0 = time.perf_counter()
    # On a Ray cluster the workers may sit on other nodes, with stores of their own: they make their own layers.
    if not opts.ray_address and make_baseline_variants(study, space, ctx, opts.trials - finished(study)):
        once["variants_s"] = time.perf_counter() - t0
    if exp.sampler == "sensitivity":
        t0 = time.perf_counter()
        study.sampler = sensitivity_sampler(exp, space, ctx, out, offset=resumed, model=search.model)
        once["profile_s"] = time.perf_counter() - t0
    return ctx, once


def _start_ray(opts: SearchOptions) -> None:
    """Join the Ray cluster at `opts.ray_address`, or start one on this machine with `opts.workers` CPUs; from
    then on a SIGTERM stops the search as Ctrl-C does."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Ray's token authentication stays on (safe by default); its notice saying so is not news to a user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if opts.ray_address:
        ray.init(address=opts.ray_address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=opts.workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if threading.current_thread() is threading.main_thread():
        # Ray's driver put in its own SIGTERM handling (exit at once, stacks dumped): a stop ends the search as
        # Ctrl-C does instead, finished trials stored and the Ray processes shut down (by _search).
        signal.signal(signal.SIGTERM, on_sigterm)


def _trial_resources(exp: Experiment) -> dict[str, float]:
    """What a trial's Ray task asks of the cluster Ray has joined (see `_resources`), with a note when that is a
    GPU the cluster does not have yet."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    resources = _resources(exp, cluster_gpus)
    if resources["num_gpus"] and not cluster_gpus:
        print(
            "note: hardware.device is cuda and the cluster has no GPU yet: the trials wait until a GPU node "
            "joins (an autoscaler starts one on demand)",
            flush=True,
        )
    return resources


def make_baseline_variants(study: optuna.Study, space: SearchSpace, ctx: TrialContext, budget: int, log=print) -> int:
    """Make the compressed layers of the uniform baselines still to run (the first `budget` of them: enqueued
    trials run first) into the variant store, before the sensitivity profile and the trials; how many plans
    it made.

    Each baseline is a new type for every layer, the costliest variants a search makes (at 1.1B on 2 cores,
    30-90 s a type against a 30 s forward pass). Made here once per search, in the driver, they are what the
    profile's probes and then the trials read: a trial's cost is then building and scoring its model, and the
    probes make no weight a baseline has. Without a store (none asked for, none on this node) nothing is made:
    the trials make their own, as they go (as they do on a Ray cluster, whose workers may not share the
    driver's disk).
    """
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    plans = [
        space.sample(optuna.trial.FixedTrial(t.system_attrs["fixed_params"]), ctx.arch)
        for t in waiting
        if t.user_attrs.get("origin") == "baseline" and "fixed_params" in t.system_attrs
    ][: max(0, budget)]
    store = open_store(ctx) if plans else None  # no folder scan when every baseline has run
    if store is None:
        return 0
    log(f"making the {len(plans)} uniform baselines' layers (once per search) ...", flush=True)
    cache, started = VariantCache(max_bytes=0, store=store), time.perf_counter()
    for k, plan in enumerate(plans, 1):
        make_variants(ctx.base, ctx.arch, plan, ctx.stats, cache)
        log(f"  layers: baseline {k}/{len(plans)}, {time.perf_counter() - started:.0f} s", flush=True)
    return len(plans)


def _loop(search: _OpenSearch, ctx: TrialContext, ctx_box: list, resources: dict[str, float]) -> float:
    """Keep `opts.workers` trials in flight, each a Ray task asking for `resources`, until the budget is spent;
    returns the set-up time (s)."""
    import ray

    study, space, opts = search.study, search.space, search.opts
    task = ray.remote(**resources, max_retries=2, retry_exceptions=False)(run_trial)
    setup_s = time.perf_counter() - search.started
    print(
        f"ready after {setup_s:.0f} s; {opts.trials - finished(study)} trials to run on {opts.workers} workers",
        flush=True,
    )
    progress = Progress(opts.trials, finished(study))
    try:
        exhausted = _run_trials(study, space, search.exp, ctx, ctx_box, search.tracker, opts, task, progress)
    finally:
        progress.close()
    if exhausted:
        print(
            f"the search space holds only {space.plan_count(ctx.arch)} distinct plans, every one tried: the search "
            f"stops after {finished(study)} of its {opts.trials} trials",
            flush=True,
        )
    return setup_s


def _run_trials(study, space, exp, ctx, ctx_box, tracker, opts, task, progress: Progress) -> bool:
    """Ask, run and record trials, `opts.workers` at a time, until the budget is spent or the space holds no
    plan not tried yet; whether the space ran out."""
    import ray

    pending: dict = {}
    exhausted = False
    while not exhausted and finished(study) + len(pending) < opts.trials or pending:
        while not exhausted and len(pending) < opts.workers and finished(study) + len(pending) < opts.trials:
            asked = ask_new(study, space, ctx.arch, [t for t, _ in pending.values()])
            if asked is None:
                exhausted = True
                break
            trial, plan = asked
            rel = plan_rel(trial.number)
            dump_yaml_model(plan, opts.out_dir / rel)
            trial.set_user_attr("plan", rel)
            # The sensitivity sampler names each trial's origin (proposed, mutated) and proposal target.
            attrs = {"origin": trial.user_attrs.get("origin", "sampled")}
            if isinstance(study.sampler, SensitivitySampler):
                attrs.update(study.sampler.trial_attrs(trial.number))
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            seed = trial_seed(exp.seed, trial.number)
            pending[task.remote(ctx_box, plan.model_dump(mode="json"), seed)] = (trial, plan)
        if not pending:
            break
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        trial, plan = pending.pop(ref)
        try:
            raw, worker, device = ray.get(ref)
            metrics, error = {**raw, **metrics_row(raw)}, None
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("device", device)
        except Exception as e:  # a raising trial is a failed trial, recorded with its reason
            metrics, error = None, failure_reason(e)
        record(study, trial, plan, metrics, error, exp, tracker, opts.out_dir)
        _, front = write_tables(study, opts.out_dir)
        progress.trial(finished(study), trial.number, trial.user_attrs["origin"], metrics, error, len(front))
        progress.front(finished(study), front)
    return exhausted


def _resources(exp: Experiment, cluster_gpus: float) -> dict[str, float]:
    """What a trial's Ray task asks for: one CPU, and its share of a GPU whenever the experiment may use one
    (`cuda`, or `auto` where the cluster has `cluster_gpus` > 0), so that Ray places trials on GPU nodes. The
    driver's own machine plays no part: it may have no GPU at all."""
    wants_gpu = exp.hardware.device == "cuda" or (exp.hardware.device == "auto" and cluster_gpus > 0)
    return {"num_cpus": 1, "num_gpus": exp.hardware.gpus_per_worker if wants_gpu else 0}
