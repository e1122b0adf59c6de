"""One trial: build the compressed model, heal it, score it, price it on the phone.

The one builder of a trial's model: the Ray task bodies (`run_trial`, `run_front_scores`), the export of a
finished trial (search/rebuild.py) and the benchmarks all call `build_plan` / `evaluate_plan` on a context
from `prepare_context`. The context (base model, references, calibration statistics) travels through the
Ray object store once; each worker process deserialises it once and keeps a variant cache across trials.

A trial is rebuilt (search/rebuild.py) from its search's output folder with the search's own inputs, the same
healing seed (the experiment's seed plus the trial number) and the torch thread count its worker ran with (the
trial's `torch_threads` metric): SVD and Kronecker factors depend on it in their last bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import Compensation, Stats, cached_covariances, cached_stats
from autosquash.compress.plan import Plan, deployed_tensors, kv_heads_per_layer
from autosquash.compress.store import VariantStore, scope_digest
from autosquash.cost import PhoneProfile, estimate, load_phone
from autosquash.errors import AutosquashError
from autosquash.evaluate.heal import HealConfig, adapter_tensors, heal
from autosquash.evaluate.proxy import Reference, reference, score
from autosquash.evaluate.texts import check_disjoint, load_texts, token_block
from autosquash.models.arch import Arch
from autosquash.models.device import (
    DTYPES,
    host_memory_bytes,
    model_device,
    peak_rss_bytes,
    release_freed_memory,
    resolve_device,
)
from autosquash.models.load import ResolvedModel, load_model, load_tokenizer, resolve_model
from autosquash.search.experiment import Experiment, HardwareSpec, TextSpec


@dataclass
class SearchInputs:
    """What a search computes once before its trials: base model, token sets, calibration statistics."""

    model: ResolvedModel
    base: torch.nn.Module
    tokenizer: Any
    arch: Arch
    calib: torch.Tensor
    held_out: torch.Tensor
    stats: Stats
    test: torch.Tensor | None = None  # the front's report set, disjoint from both (None: no test split)
    load_s: float = 0.0  # reading the model
    calibration_s: float = 0.0  # its activation statistics (0 when the disk cache held them)
    store_dir: Path | None = None  # the search's variant store (compressed layers on disk)


def text_batch(tokenizer, spec: TextSpec, skip: int = 0) -> torch.Tensor:
    """The token batch a text spec names (after the source's first `skip` tokens)."""
    return token_block(tokenizer, load_texts(spec.source), spec.tokens, spec.seq_len, skip)


def test_batch(tokenizer, exp: Experiment, calib: torch.Tensor, held_out: torch.Tensor) -> torch.Tensor | None:
    """The test set: the experiment's `test` spec, or the evaluation source's tokens after the evaluation set
    (of its size). Taken after what the calibration or evaluation set took of the same source, and checked
    disjoint from both by content. None where a derived split finds too little text."""
    spec = exp.test or exp.evaluation
    skip = held_out.numel() if spec.source == exp.evaluation.source else 0
    # Compensation's covariances take the calibration source's first compensation_tokens.
    taken = exp.calibration.compensation_tokens if exp.calibration.error_compensation != "none" else 0
    skip = max(calib.numel(), taken) if spec.source == exp.calibration.source else skip
    try:
        test = text_batch(tokenizer, spec, skip)
    except AutosquashError:
        if exp.test is not None:
            raise
        print(f"no test split: {spec.source} holds no {spec.seq_len} tokens after the evaluation set", flush=True)
        return None
    check_disjoint(calib, test)
    check_disjoint(held_out, test)
    return test


def load_inputs(
    exp: Experiment, out_dir: Path, device: torch.device | None = None, model: ResolvedModel | None = None
) -> SearchInputs:
    """Load the base model and tokenizer, cut the token sets, and get the (disk-cached) statistics, computed on
    `device` (None: the experiment's hardware.device, resolved on this machine). `model`: exp.model as the
    caller resolved it (None: resolved here)."""
    model = model or resolve_model(exp.model)
    tok = load_tokenizer(model)
    calib = text_batch(tok, exp.calibration)
    held_out = text_batch(tok, exp.evaluation)
    check_disjoint(calib, held_out)  # before the model loads: a refused search should cost seconds
    test = test_batch(tok, exp, calib, held_out)
    compensation_batch = None
    if exp.calibration.error_compensation != "none":
        spec = exp.calibration
        compensation_batch = text_batch(
            tok, TextSpec(source=spec.source, tokens=spec.compensation_tokens, seq_len=spec.seq_len)
        )
        for other in (held_out, test):
            if other is not None:
                check_disjoint(compensation_batch, other)
    device = device or resolve_device(exp.hardware.device)
    print(f"loading {exp.model} onto {device} ...", flush=True)
    t0 = time.perf_counter()
    base = load_model(model, seed=exp.seed).to(device, DTYPES[exp.hardware.dtype])
    t1 = time.perf_counter()
    print(f"calibrating on {calib.numel()} tokens, held-out set {held_out.numel()} tokens ...", flush=True)
    stats = cached_stats(base, calib, model.key, out_dir / "cache")
    if compensation_batch is not None:
        print(f"input covariances for error compensation over {compensation_batch.numel()} tokens ...", flush=True)
        covariances = cached_covariances(
            base,
            compensation_batch,
            model.key,
            out_dir / "cache",
            token_normalized=exp.calibration.compensation_token_normalized,
        )
        stats.compensation = Compensation(
            covariances, exp.calibration.compensation_damp, exp.calibration.error_compensation
        )
    arch = Arch.from_config(base.config)
    scope = scope_digest(model.key, exp.seed, exp.hardware.dtype, stats)
    store = out_dir / "cache" / "variants" / scope
    return SearchInputs(model, base, tok, arch, calib, held_out, stats, test, t1 - t0, time.perf_counter() - t1, store)


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
    phone: PhoneProfile
    heal: HealConfig
    context_tokens: int
    threads_per_worker: int
    tokenizer: Any = None  # for lm-eval on the front
    # Where the base model computes: the experiment's hardware.device as each worker resolves it on its node.
    compute_device: str = "cpu"
    compute_dtype: str = "float32"
    variant_cache_bytes: int = 2 << 30
    variant_store: str | None = None  # folder of the variant store the workers share (None: none)
    variant_store_bytes: int = 0
    heal_activation_bytes: int | None = None  # above it, healing checkpoints its blocks (None: heal_budget)
    memory_share_bytes: int = 8 << 30  # a worker's share of the memory its model computes in
    test_ref: Reference | None = None  # the front's report set (None: no test split)
    hardware: HardwareSpec = HardwareSpec()  # what the experiment asks for; each worker sizes itself from it
    workers: int = 1  # the trials a search keeps in flight, over all nodes


def prepare_context(exp: Experiment, inputs: SearchInputs, workers: int, test_split: bool = True) -> TrialContext:
    """What every trial of `exp` reads (base model, reference logits, phone, healing); also what an
    export or a benchmark needs to rebuild a trial exactly as the search ran it. Sized for one of `workers`
    on this machine, computing where the inputs' base model sits (a Ray worker sizes it again for its node:
    for_this_node). `test_split` False: no reference logits for the test split, which only the front's
    scoring reads (a rebuild for export skips that forward pass)."""
    ctx = TrialContext(
        base=inputs.base,
        arch=inputs.arch,
        stats=inputs.stats,
        calib_ref=reference(inputs.base, inputs.calib, exp.topk),
        eval_ref=reference(inputs.base, inputs.held_out, exp.topk),
        phone=load_phone(exp.phone),
        heal=HealConfig(**exp.heal.model_dump()),
        context_tokens=exp.context_tokens,
        threads_per_worker=1,
        tokenizer=inputs.tokenizer,
        compute_dtype=exp.hardware.dtype,
        variant_store=None if inputs.store_dir is None else str(inputs.store_dir),
        variant_store_bytes=_store_bytes(exp, inputs),
        heal_activation_bytes=exp.hardware.heal_activation_bytes,
        test_ref=None if inputs.test is None or not test_split else reference(inputs.base, inputs.test, exp.topk),
        hardware=exp.hardware,
        workers=workers,
    )
    return for_this_node(ctx, workers, model_device(inputs.base))


def for_this_node(ctx: TrialContext, workers: int, device: torch.device | None = None) -> TrialContext:
    """`ctx` for a worker on this machine, one of `workers` sharing it: computing on `device` (None: the
    experiment's hardware.device resolved here, an error where it asks for CUDA and this machine has none),
    with this machine's CPUs, memory and GPU memory shared out."""
    device = device or resolve_device(ctx.hardware.device)
    return dataclasses.replace(
        ctx,
        compute_device=str(device),
        threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
        variant_cache_bytes=ctx.hardware.variant_cache_bytes or default_cache_bytes(ctx.base, workers),
        memory_share_bytes=_memory_share(device, ctx.hardware.gpus_per_worker, workers),
    )


def workers_on_node(workers: int) -> int:
    """How many of a search's `workers` trials the Ray node running this task holds at once: one per CPU Ray
    gives it (a trial takes one), fewer where its GPUs, at this task's share each, run out."""
    import ray

    context = ray.get_runtime_context()
    node = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == context.get_node_id())
    slots = node.get("CPU", 1.0)
    gpus = context.get_assigned_resources().get("GPU", 0.0)
    if gpus:
        slots = min(slots, node.get("GPU", 0.0) / gpus)
    return max(1, min(workers, int(slots)))


def default_cache_bytes(base: torch.nn.Module, workers: int) -> int:
    """A worker's variant cache by default: what is left of half its share of host memory once it holds the base
    model, a trial's float model and healing's activations (about 2.5 float32 copies of the weights), at most a
    quarter of the share and at least 256 MiB. The variants live in host memory whatever device trials use."""
    share = host_memory_bytes() // workers
    weights = sum(p.numel() for p in base.parameters()) * 4
    return int(min(share // 4, max(256 << 20, share // 2 - 2.5 * weights)))


def _store_bytes(exp: Experiment, inputs: SearchInputs) -> int:
    """The variant store's cap: the experiment's, else four float32 copies of the weights (every layer in
    several types), at most a quarter of the disk's free space."""
    if exp.hardware.variant_store_bytes is not None or inputs.store_dir is None:
        return exp.hardware.variant_store_bytes or 0
    weights = sum(p.numel() for p in inputs.base.parameters()) * 4
    folder = next(p for p in (inputs.store_dir, *inputs.store_dir.parents) if p.exists())
    return int(min(4 * weights, shutil.disk_usage(folder).free // 4))


def open_store(ctx: TrialContext) -> VariantStore | None:
    """The context's variant store, or None (none asked for, or its folder cannot be made on this node)."""
    if not ctx.variant_store or ctx.variant_store_bytes <= 0:
        return None
    try:
        return VariantStore(ctx.variant_store, ctx.variant_store_bytes)
    except OSError as e:
        print(f"note: no variant store on this node ({e}); its workers keep variants in memory only", flush=True)
        return None


def _memory_share(device: torch.device, gpus_per_worker: float, workers: int) -> int:
    """A worker's share of the memory its model computes in: host memory over the workers, or on CUDA its
    fraction of one GPU."""
    if device.type != "cuda":
        return host_memory_bytes() // workers
    return int(torch.cuda.get_device_properties(device).total_memory * min(gpus_per_worker, 1.0))


def heal_budget(ctx: TrialContext, cache: VariantCache) -> int:
    """The activation bytes healing may take before it checkpoints (the experiment's figure, if it gives one):
    what half the worker's memory share leaves beside the base model, the trial's float model and, on the
    CPU, the variant cache as it stands."""
    if ctx.heal_activation_bytes:
        return ctx.heal_activation_bytes
    weights = sum(p.numel() * p.element_size() for p in ctx.base.parameters())
    held = 2 * weights + (cache.nbytes if ctx.compute_device == "cpu" else 0)
    return max(0, ctx.memory_share_bytes // 2 - held)


def trial_seed(seed: int, number: int) -> int:
    """The healing seed of trial `number` of a search seeded `seed`: what the search passes to run_trial."""
    return seed + number


# Per worker process: the context it deserialised last, and its variant cache.
_WORKER: dict[str, Any] = {}


def merges_adapter(arch: Arch, plan: Plan) -> bool:
    """Whether healing merges into the weights: only when every block weight stays F16/F32 (float)."""
    return all(t.type in ("F16", "F32") for t in deployed_tensors(arch, plan) if t.name.startswith("blk."))


def build_plan(ctx: TrialContext, plan: Plan, seed: int, cache: VariantCache | None = None):
    """The trial's model: compressed, then healed (deterministic for a plan and seed); and its build
    and heal statistics (build_s = quantize_s, making the variants the cache lacked, + assemble_s)."""
    cache = cache if cache is not None else VariantCache(max_bytes=0)
    start, made_before = time.perf_counter(), cache.make_s
    model = compress(ctx.base, ctx.arch, plan, ctx.stats, cache)
    build_s = time.perf_counter() - start
    quantize_s = cache.make_s - made_before
    merge = merges_adapter(ctx.arch, plan)
    model, info = heal(model, ctx.calib_ref, ctx.heal, seed, merge, activation_budget=heal_budget(ctx, cache))
    heal_s = time.perf_counter() - start - build_s
    return model, {
        **info,
        "build_s": build_s,
        "quantize_s": quantize_s,
        "assemble_s": build_s - quantize_s,
        "heal_s": heal_s,
    }


def evaluate_plan(ctx: TrialContext, plan: Plan, seed: int, cache: VariantCache | None = None) -> dict[str, float]:
    """Build, heal, score and price one plan; the result's keys are metric names."""
    release_freed_memory()  # what the previous trial left
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
        ctx.phone,
        context_tokens=ctx.context_tokens,
        kv_heads_per_layer=kv_heads_per_layer(ctx.arch, plan),
    )
    out = {**quality, **{k: float(v) for k, v in cost.to_dict().items()}, **build_info}
    out.update(eval_s=t3 - t2, trial_s=t3 - t0, peak_worker_rss_bytes=peak_rss_bytes())
    if torch.cuda.is_available() and model_device(ctx.base).type == "cuda":
        out.update(peak_worker_gpu_bytes=torch.cuda.max_memory_allocated(model_device(ctx.base)))
    if cache is not None:
        out.update(cache_hits=cache.hits, cache_misses=cache.misses, variant_cache_bytes=cache.nbytes)
        if cache.store is not None:
            out.update(cache_stored_hits=cache.stored_hits, variant_store_bytes=cache.store.nbytes)
    return out


def _worker_context(ctx_ref_box: list) -> tuple[TrialContext, VariantCache]:
    """This worker process's copy of the context (fetched once per search), sized for its node, and its
    variant cache.

    `ctx_ref_box` wraps the context's ObjectRef so that Ray does not resolve it for every task.
    """
    import warnings

    import ray

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, per trial
    ctx_ref = ctx_ref_box[0]
    if _WORKER.get("ref_hex") != ctx_ref.hex():
        _WORKER.clear()
        ctx: TrialContext = ray.get(ctx_ref)
        # The driver sized it for the driver's machine: the device, threads and memory shares are this node's.
        ctx = for_this_node(ctx, workers_on_node(ctx.workers))
        torch.set_num_threads(ctx.threads_per_worker)
        # The driver ships the base model on the CPU; each worker holds it once, on its own device.
        ctx.base.to(ctx.compute_device, DTYPES[ctx.compute_dtype])
        cache = VariantCache(max_bytes=ctx.variant_cache_bytes, store=open_store(ctx))
        _WORKER.update(ref_hex=ctx_ref.hex(), ctx=ctx, cache=cache)
    return _WORKER["ctx"], _WORKER["cache"]


def _worker_name() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:12]}/{os.getpid()}"


def run_trial(ctx_ref_box: list, plan_data: dict, seed: int) -> tuple[dict[str, float], str, str]:
    """Ray task body: the trial's metrics (its torch threads among them), the worker (node/pid) that ran it and
    the device it computed on."""
    ctx, cache = _worker_context(ctx_ref_box)
    metrics = evaluate_plan(ctx, Plan.model_validate(plan_data), seed, cache)
    # SVD/Kronecker factors depend on the thread count, so an export rebuilds with the worker's.
    return {**metrics, "torch_threads": ctx.threads_per_worker}, _worker_name(), ctx.compute_device


def run_front_scores(ctx_ref_box: list, plan_data: dict, seed: int, tasks: list[str], limit: int | None) -> dict:
    """Ray task body: a front plan rebuilt as its trial built it, scored on the test set ({"test": {"kl",
    "perplexity"}}, None without a test split) and by lm-eval ({"tasks": {task: {metric: value}}}, empty
    without tasks)."""
    from autosquash.evaluate.benchmark import run_tasks

    ctx, cache = _worker_context(ctx_ref_box)
    model, _ = build_plan(ctx, Plan.model_validate(plan_data), seed, cache)
    test = None if ctx.test_ref is None else score(model, ctx.test_ref)
    if not tasks:
        return {"test": test, "tasks": {}}
    # lm-eval's progress bars (stderr; they ignore TQDM_DISABLE) would flood the driver's log from every
    # worker; the driver prints one line per plan instead. Errors still come back as exceptions.
    with contextlib.redirect_stderr(io.StringIO()):
        return {"test": test, "tasks": run_tasks(model, ctx.tokenizer, tasks, limit)}
