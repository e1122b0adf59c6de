"""The samplers a search can use: Optuna's (TPE, NSGA-II, random, GP), sized for a phone search's few dozen trials,
and the sensitivity sampler, which proposes plans from a measured per-group damage model."""

from __future__ import annotations

from pathlib import Path

import optuna

from autosquash.compress.apply import VariantCache
from autosquash.compress.plan import Plan
from autosquash.models.load import Model, ResolvedModel, resolve_model
from autosquash.search.experiment import Experiment
from autosquash.search.profile import cached_profile
from autosquash.search.sensitivity import SensitivitySampler, proposal_targets
from autosquash.search.space import SearchSpace
from autosquash.search.trial import TrialContext, open_store


def make_sampler(exp: Experiment, budget: int, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The experiment's sampler, sized for a search of `budget` trials; each honours the phone-fit
    constraint set on its trials.

    Optuna's defaults (TPE: 10 random start-up trials; NSGA-II: generations of 50) assume hundreds of
    trials: at a phone search's few dozen, NSGA-II would never leave its random first generation. So the
    start-up and the generation are a quarter of the budget (TPE 4..10 trials, NSGA-II 4..50 plans).
    `sensitivity` needs the base model: the study starts with TPE and `sensitivity_sampler` replaces it
    once the inputs are loaded. `offset` (the trials a resumed study already holds) shifts the seed: a
    sampler re-created with the experiment's own seed would draw its first plans again.
    """
    seed = exp.seed + offset
    quarter = max(4, budget // 4)
    if exp.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=min(50, quarter), seed=seed)
    if exp.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, quarter)
    if exp.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)


FRONT_STEP = 0.02  # the widest gap the sensitivity sampler leaves between plans, as a share of the base file


def base_file_bytes(model: Model, arch) -> int:
    """The size of the model a user starts from: its GGUF file, else its F16 GGUF file."""
    from autosquash.compress.plan import deployed_tensors

    src = resolve_model(model).source
    if src.kind == "gguf":
        return Path(src.location, src.gguf_file).stat().st_size
    return sum(t.nbytes for t in deployed_tensors(arch, Plan.uniform(arch, "F16")))


def sensitivity_sampler(
    exp: Experiment,
    space: SearchSpace,
    ctx: TrialContext,
    out: Path,
    offset: int = 0,
    model: ResolvedModel | None = None,
) -> SensitivitySampler:
    """The per-group damage model (measured once, cached on disk) and a sampler proposing from it; `model`:
    exp.model as the caller resolved it (None: resolved here)."""
    model = model or resolve_model(exp.model)
    # The tables it quantizes go to the trials' variant store: the workers read them instead of making them.
    variants = VariantCache(max_bytes=0, store=open_store(ctx))
    profile = cached_profile(
        ctx.base,
        ctx.arch,
        space,
        ctx.stats,
        ctx.calib_ref,
        exp.context_tokens,
        model.key,
        out / "cache",
        variants,
    )
    sizes = [profile.size(*profile.picks_of(space.baseline_params(ctx.arch, b))) for b in space.baselines]
    # A plan at least every 2 % of the base model's file size (targets closer, as plans land a little under).
    step = int(FRONT_STEP * 0.8 * base_file_bytes(model, ctx.arch))
    return SensitivitySampler(profile, proposal_targets(profile, sizes, step), seed=exp.seed + offset, band=step)
