"""The model an export writes: a search's trial rebuilt exactly as the trial built it, or a plan applied alone.

A trial is rebuilt from its search's output folder with the search's own inputs (base model, disk-cached
calibration statistics, healing batch), the same healing seed (the experiment's seed plus the trial
number, as the driver gives it) and the torch thread count its worker ran with (the trial's
`torch_threads` metric): SVD and Kronecker factors depend on it in their last bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import Stats, cached_stats
from autosquash.compress.plan import Plan
from autosquash.errors import AutosquashError
from autosquash.export.gguf_file import deploys_factors
from autosquash.models.arch import Arch

if TYPE_CHECKING:
    from autosquash.search.experiment import Experiment

# Keep every compressed tensor: the writers then read the very bytes the model was built from.
_KEEP_ALL = 1 << 62


@dataclass
class BuiltModel:
    """A plan applied to its base model, as a trial evaluates it, with what the file writers read."""

    spec: str  # the base model's spec (its config and tokenizer)
    base: torch.nn.Module
    arch: Arch
    plan: Plan
    stats: Stats
    model: torch.nn.Module  # compressed, then healed as its trial was (a peft model if the adapter stays apart)
    cache: VariantCache
    heal_info: dict = field(default_factory=dict)  # build_plan's healing summary ({} when not healed)

    @property
    def healing(self) -> str | None:
        """Where the trial's LoRA healing is: "adapter" (kept beside the weights), "merged" or None."""
        if not self.heal_info.get("heal_steps"):
            return None
        return "merged" if self.heal_info.get("heal_merged") else "adapter"


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


def trial_seed(seed: int, number: int) -> int:
    """The healing seed of trial `number` of a search seeded `seed`: what the driver passes to run_trial."""
    return seed + number


def _trial_threads(run: Path, experiment: str, number: int) -> int | None:
    """The torch thread count trial `number` ran with, from its MLflow run (None if not recorded)."""
    from mlflow.exceptions import MlflowException

    from autosquash.track.mlflow_store import find_trial_run

    uri_file = run / "tracking_uri.txt"
    if not uri_file.exists():
        return None
    try:
        trial_run = find_trial_run(uri_file.read_text().strip(), experiment, number)
    except MlflowException:  # a tracking server out of reach: rebuild with this process's threads
        return None
    threads = None if trial_run is None else trial_run.data.metrics.get("torch_threads")
    return int(threads) if threads else None


def rebuild_trial(run: Path, number: int) -> tuple[BuiltModel, Experiment, Path]:
    """Trial `number` of the search in `run`: (its BuiltModel, the experiment, its plan file)."""
    from autosquash.search.driver import load_inputs, prepare_context
    from autosquash.search.experiment import load_experiment
    from autosquash.search.runner import build_plan
    from autosquash.yaml_io import load_yaml_model

    if not (run / "experiment.yaml").is_file():
        raise AutosquashError(f"{run} is not a search's output folder (it has no experiment.yaml)")
    plan_file = run / "plans" / f"trial-{number:04d}.yaml"
    if not plan_file.exists():
        raise AutosquashError(f"{run} holds no trial {number} ({plan_file} is missing)")
    exp = load_experiment(run / "experiment.yaml")
    plan = load_yaml_model(Plan, plan_file)
    inputs = load_inputs(exp, run)
    ctx = prepare_context(exp, inputs, workers=1)  # the trial's context: healing batch and config
    cache = VariantCache(max_bytes=_KEEP_ALL)
    threads = _trial_threads(run, exp.name, number)
    if threads is None and deploys_factors(inputs.arch, plan):
        print(
            f"note: trial {number} has no torch thread count recorded; "
            "its SVD/Kronecker factors may differ from the trial's in their last bits"
        )
    with _threads(threads):
        model, info = build_plan(ctx, plan, trial_seed(exp.seed, number), cache)
    built = BuiltModel(exp.model, inputs.base, inputs.arch, plan, inputs.stats, model, cache, info)
    return built, exp, plan_file


def plan_model(spec: str, plan: Plan | str, cache_dir: Path) -> BuiltModel:
    """`spec` compressed by `plan` (or one GGUF type for every weight), without healing: no trial heals it.

    Calibration statistics come from the shipped Wikipedia text, cached in `cache_dir`.
    """
    from autosquash.compress.gguf_types import tensor_type
    from autosquash.models.load import load_model, load_tokenizer, resolve
    from autosquash.search.driver import text_batch
    from autosquash.search.experiment import TextSpec

    base = load_model(spec)
    arch = Arch.from_config(base.config)
    if isinstance(plan, str):
        plan = Plan.uniform(arch, tensor_type(plan).name)
    calib = text_batch(load_tokenizer(spec), TextSpec(source="wikipedia"))
    stats = cached_stats(base, calib, resolve(spec).key, cache_dir)
    cache = VariantCache(max_bytes=_KEEP_ALL)
    return BuiltModel(spec, base, arch, plan, stats, compress(base, arch, plan, stats, cache), cache)
