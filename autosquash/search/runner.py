"""One trial as a Ray task: build the compressed model, heal it, score it, price it on the phone.

The trial context (base model, references, calibration statistics) travels through the Ray object
store once; each worker process deserialises it once and keeps a variant cache across its trials.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import Stats
from autosquash.compress.plan import Plan, deployed_tensors, kv_heads_per_layer
from autosquash.cost import DeviceProfile, estimate
from autosquash.evaluate.heal import HealConfig, adapter_tensors, heal
from autosquash.evaluate.proxy import Reference, score
from autosquash.models.arch import Arch


class TrialFailed(Exception):
    """A trial that ran but produced no usable result (NaN quality, say); recorded as failed."""


@dataclass
class TrialContext:
    """Everything a trial reads, shared by all trials of a search."""

    base: torch.nn.Module
    arch: Arch
    stats: Stats
    calib_ref: Reference
    eval_ref: Reference
    device: DeviceProfile
    heal: HealConfig
    context_tokens: int
    threads_per_worker: int
    tokenizer: Any = None  # for lm-eval on the front


# Per worker process: the context it deserialised last, and its variant cache.
_WORKER: dict[str, Any] = {}


def merges_adapter(arch: Arch, plan: Plan) -> bool:
    """Whether healing merges into the weights: only when every block weight stays F16/F32 (float)."""
    return all(t.type in ("F16", "F32") for t in deployed_tensors(arch, plan) if t.name.startswith("blk."))


def build_plan(ctx: TrialContext, plan: Plan, seed: int, cache: VariantCache | None = None):
    """The trial's model: compressed, then healed (deterministic for a plan and seed); and its build
    and heal statistics."""
    start = time.perf_counter()
    model = compress(ctx.base, ctx.arch, plan, ctx.stats, cache)
    build_s = time.perf_counter() - start
    model, info = heal(model, ctx.calib_ref, ctx.heal, seed=seed, merge=merges_adapter(ctx.arch, plan))
    return model, {**info, "build_s": build_s, "heal_s": time.perf_counter() - start - build_s}


def evaluate_plan(ctx: TrialContext, plan: Plan, seed: int, cache: VariantCache | None = None) -> dict[str, float]:
    """Build, heal, score and price one plan; the result's keys are metric names."""
    t0 = time.perf_counter()
    model, build_info = build_plan(ctx, plan, seed, cache)
    t2 = time.perf_counter()
    quality = score(model, ctx.eval_ref)
    t3 = time.perf_counter()
    if not all(math.isfinite(v) for v in quality.values()):
        raise TrialFailed(f"quality is not finite: {quality}")
    tensors = deployed_tensors(ctx.arch, plan) + adapter_tensors(model)
    cost = estimate(
        ctx.arch,
        tensors,
        ctx.device,
        context_tokens=ctx.context_tokens,
        kv_heads_per_layer=kv_heads_per_layer(ctx.arch, plan),
    )
    out = {**quality, **{k: float(v) for k, v in cost.to_dict().items()}, **build_info}
    out.update(eval_s=t3 - t2, trial_s=t3 - t0)
    if cache is not None:
        out.update(cache_hits=cache.hits, cache_misses=cache.misses)
    return out


def _worker_context(ctx_ref_box: list) -> tuple[TrialContext, VariantCache]:
    """This worker process's copy of the context (fetched once per search) and its variant cache.

    `ctx_ref_box` wraps the context's ObjectRef so that Ray does not resolve it for every task.
    """
    import warnings

    import ray

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, per trial
    ctx_ref = ctx_ref_box[0]
    if _WORKER.get("ref_hex") != ctx_ref.hex():
        _WORKER.clear()
        ctx: TrialContext = ray.get(ctx_ref)
        torch.set_num_threads(ctx.threads_per_worker)
        _WORKER.update(ref_hex=ctx_ref.hex(), ctx=ctx, cache=VariantCache())
    return _WORKER["ctx"], _WORKER["cache"]


def _worker_name() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:12]}/{os.getpid()}"


def run_trial(ctx_ref_box: list, plan_data: dict, seed: int) -> tuple[dict[str, float], str]:
    """Ray task body: the trial's metrics and the worker (node/pid) that ran it."""
    ctx, cache = _worker_context(ctx_ref_box)
    return evaluate_plan(ctx, Plan.model_validate(plan_data), seed, cache), _worker_name()


def run_benchmark(ctx_ref_box: list, plan_data: dict, seed: int, tasks: list[str], limit: int | None) -> dict:
    """Ray task body: lm-eval scores {task: {metric: value}} of a front plan, rebuilt as its trial built it."""
    from autosquash.evaluate.benchmark import run_tasks

    ctx, cache = _worker_context(ctx_ref_box)
    model, _ = build_plan(ctx, Plan.model_validate(plan_data), seed, cache)
    # lm-eval's progress bars (stderr; they ignore TQDM_DISABLE) would flood the driver's log from every
    # worker; the driver prints one line per plan instead. Errors still come back as exceptions.
    with contextlib.redirect_stderr(io.StringIO()):
        return run_tasks(model, ctx.tokenizer, tasks, limit)
