"""The model an export writes: a plan applied to its base model, with what the file writers read.

A search's trial is rebuilt as its trial built it by autosquash.search.rebuild.rebuild_trial; `plan_model`
applies a plan alone (no healing: no trial healed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from autosquash.compress.apply import VariantCache, make_variants
from autosquash.compress.calibrate import Stats, cached_stats
from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.formats.gguf_types import tensor_type
from autosquash.models.arch import Arch
from autosquash.models.load import Model, ResolvedModel, load_model, load_tokenizer, resolve_model

# Keep every compressed tensor: the writers then read the very bytes the model was built from.
KEEP_ALL = 1 << 62


@dataclass
class BuiltModel:
    """A plan applied to its base model, as a trial evaluates it, with what the file writers read."""

    spec: Model  # the base model (its config and tokenizer): its spec, or resolved already
    base: torch.nn.Module
    arch: Arch
    plan: Plan
    stats: Stats
    # Compressed, then healed as its trial was (a peft model if the adapter stays apart); None for a plan applied
    # alone, whose writers need only the variants' bytes in `cache`.
    model: torch.nn.Module | None = None
    cache: VariantCache | None = None  # None: the writers make each compressed tensor afresh
    heal_info: dict = field(default_factory=dict)  # build_plan's healing summary ({} when not healed)

    @cached_property
    def base_model(self) -> ResolvedModel:
        """`spec` resolved (once, where it came as a spec)."""
        return resolve_model(self.spec)

    @property
    def base_spec(self) -> str:
        """The base model's spec as the user gave it (nothing resolved)."""
        return self.spec.spec if isinstance(self.spec, ResolvedModel) else self.spec

    @property
    def healing(self) -> str | None:
        """Where the trial's LoRA healing is: "adapter" (kept beside the weights), "merged" or None (not healed,
        or its adapter dropped because it did not lower the KL)."""
        if not self.heal_info.get("heal_steps") or self.heal_info.get("heal_kept") == 0.0:
            return None
        return "merged" if self.heal_info.get("heal_merged") else "adapter"


def plan_model(spec: Model, plan: Plan | str, cache_dir: Path) -> BuiltModel:
    """`spec` compressed by `plan` (or one GGUF type for every weight), without healing: no trial heals it. Its
    variants are made into the cache; no float model is assembled, since the writers read only their bytes
    (on Qwen2.5-1.5B that decoding was 50 of an export's 300 s).

    Calibration statistics come from the shipped Wikipedia text, cached in `cache_dir`.
    """
    base_model = resolve_model(spec)
    base = load_model(base_model)
    arch = Arch.from_config(base.config)
    if isinstance(plan, str):
        plan = Plan.uniform(arch, tensor_type(plan).name)
    calib = token_block(load_tokenizer(base_model), load_texts("wikipedia"), 2048, 256)
    stats = cached_stats(base, calib, base_model.key, cache_dir)
    cache = VariantCache(max_bytes=KEEP_ALL)
    make_variants(base, arch, plan, stats, cache)
    return BuiltModel(base_model, base, arch, plan, stats, cache=cache)


def deploys_factors(arch: Arch, plan: Plan) -> bool:
    """Whether the plan deploys low-rank or Kronecker factors (no GGUF runtime holds them)."""
    return any(not t.name.endswith((".weight", ".bias")) for t in deployed_tensors(arch, plan))
