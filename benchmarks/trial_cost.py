"""Where a trial's time goes (build, heal, evaluate), and what the caches save, side by side in one process.

1. Six plans, several sharing layer variants (uniform Q4_0 and Q4_K, mixes of the two, Q4_0 with pruned
   FFNs, uniform Q8_0), each run as a trial twice: with no variant cache (VariantCache(max_bytes=0)), then
   with one cache shared by the plans in this order, as a worker keeps it across its trials. Torch
   threads as on one of the experiment's workers.
2. What a search computes once instead of per trial: loading the model, the calibration statistics
   (computed, or read from the disk cache) and the base model's reference logits.

    .venv/bin/python benchmarks/trial_cost.py [--experiment FILE] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import DEFAULT_EXPERIMENT, SMOKE_EXPERIMENT, evaluate, table

from autosquash.compress.apply import VariantCache
from autosquash.compress.calibrate import cached_stats
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.models.arch import Arch
from autosquash.models.load import load_model, load_tokenizer, resolve
from autosquash.search.experiment import Experiment, load_experiment
from autosquash.search.trial import SearchInputs, prepare_context, text_batch


def plans(arch: Arch) -> dict[str, Plan]:
    """Plans in the order a worker might meet them: the later ones reuse the earlier ones' variants."""
    q40, q4k = Plan.uniform(arch, "Q4_0", embed_quant="Q8_0"), Plan.uniform(arch, "Q4_K", embed_quant="Q8_0")
    attn_ffn = {g: (q40 if g.endswith("attn") else q4k).groups[g] for g in q40.groups}
    alternate = {g: (q40 if int(g.split(".")[1]) % 2 == 0 else q4k).groups[g] for g in q40.groups}
    pruned_ffn = LayerChoice(quant="Q4_0", ffn_keep_ratio=0.75)
    pruned = {g: pruned_ffn if g.endswith("ffn") else c for g, c in q40.groups.items()}
    return {
        "uniform Q4_0": q40,
        "uniform Q4_K": q4k,
        "attn Q4_0, FFN Q4_K": Plan(groups=attn_ffn),
        "blocks Q4_0 / Q4_K in turn": Plan(groups=alternate),
        "Q4_0, FFN 75 % kept": Plan(groups=pruned),
        "uniform Q8_0": Plan.uniform(arch, "Q8_0", embed_quant="Q8_0"),
    }


def one_off(exp: Experiment) -> tuple[SearchInputs, dict[str, float]]:
    """The search's inputs, and the seconds of what it computes once (the driver's threads: all cores)."""
    s: dict[str, float] = {}
    t = time.perf_counter()
    base, tok = load_model(exp.model, seed=exp.seed), load_tokenizer(exp.model)
    s["model and tokenizer load"] = time.perf_counter() - t
    calib, held_out = text_batch(tok, exp.calibration), text_batch(tok, exp.evaluation)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cached_stats(base, calib, resolve(exp.model).key, Path(cache))
        s["calibration statistics, computed (and written)"] = time.perf_counter() - t
        t = time.perf_counter()
        stats = cached_stats(base, calib, resolve(exp.model).key, Path(cache))
        s["calibration statistics, read from the disk cache"] = time.perf_counter() - t
    return SearchInputs(exp.model, base, tok, Arch.from_config(base.config), calib, held_out, stats), s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", type=Path, default=None, help="default: the default experiment")
    p.add_argument("--quick", action="store_true", help="the smoke experiment's tiny model (tests the script)")
    args = p.parse_args()
    exp = load_experiment(args.experiment or (SMOKE_EXPERIMENT if args.quick else DEFAULT_EXPERIMENT))
    print(f"loading {exp.model} ...", flush=True)
    inputs, once = one_off(exp)
    t = time.perf_counter()
    ctx = prepare_context(exp, inputs, exp.workers)  # the reference logits on calibration and held-out text
    once["base reference logits (calibration + held-out)"] = time.perf_counter() - t
    torch.set_num_threads(ctx.threads_per_worker)

    todo = plans(ctx.arch)
    print("warm-up trial (first-call costs: imports, allocator) ...", flush=True)
    evaluate(ctx, next(iter(todo.values())), exp.seed, VariantCache(max_bytes=0))
    # Two passes over the plans, so that neither gains from running just after the other on the same plan.
    print("pass 1: no variant cache ...", flush=True)
    colds = [evaluate(ctx, plan, exp.seed, VariantCache(max_bytes=0)) for plan in todo.values()]
    print("pass 2: one variant cache shared by the plans ...", flush=True)
    shared, warms, counts = VariantCache(), [], []
    for plan in todo.values():
        hits, misses = shared.hits, shared.misses
        warms.append(evaluate(ctx, plan, exp.seed, shared))
        counts.append(f"{shared.hits - hits}/{shared.misses - misses}")
    rows = []
    for name, cold, warm, count in zip(todo, colds, warms, counts, strict=True):
        if warm["perplexity"] != cold["perplexity"]:
            raise SystemExit(f"{name}: perplexity {warm['perplexity']} with the cache, {cold['perplexity']} without")
        rows.append(
            [name, f"{cold['build_s']:.2f}", f"{warm['build_s']:.2f}", count]
            + [f"{cold['build_s'] / warm['build_s']:.1f}x", f"{warm['heal_s']:.2f}", f"{warm['eval_s']:.2f}"]
            + [f"{cold['trial_s']:.2f}", f"{warm['trial_s']:.2f}"]
        )
    total = {k: (sum(c[k] for c in colds), sum(w[k] for w in warms)) for k in ("build_s", "trial_s")}
    rows.append(
        ["total", f"{total['build_s'][0]:.2f}", f"{total['build_s'][1]:.2f}", f"{shared.hits}/{shared.misses}"]
        + [f"{total['build_s'][0] / total['build_s'][1]:.1f}x"]
        + [f"{sum(w['heal_s'] for w in warms):.2f}", f"{sum(w['eval_s'] for w in warms):.2f}"]
        + [f"{total['trial_s'][0]:.2f}", f"{total['trial_s'][1]:.2f}"]
    )
    print(
        f"\n{exp.name}: seconds per trial, {ctx.threads_per_worker} torch thread(s) as on one of "
        f"{exp.workers} workers; heal {exp.heal.steps} steps; score on {ctx.eval_ref.batch.numel()} held-out tokens"
    )
    headers = ["plan", "build no cache", "build cached", "hits/misses", "build speed-up", "heal", "score"]
    print(table([*headers, "trial no cache", "trial cached"], rows))
    print("cached: one variant cache shared by the plans in this order (a worker keeps one across its trials)")
    print(
        f"the cache ends holding {shared.nbytes / 1e6:.0f} MB of GGUF bytes for {shared.misses} variants,"
        f" {shared.decoded_nbytes() / 1e6:.0f} MB once decoded to float32 (decoded on every use)"
    )

    mean_trial = statistics.mean(w["trial_s"] for w in warms)
    print(f"\nPaid once per search, not per trial (against a mean cached trial of {mean_trial:.2f} s)")
    print(
        table(
            ["step", "seconds", "share of a trial"],
            [[k, f"{v:.2f}", f"{v / mean_trial:.0%}"] for k, v in once.items()],
        )
    )
    stats_s = [v for k, v in once.items() if k.startswith("calibration")]
    print(f"the disk cache reads the calibration statistics {stats_s[0] / stats_s[1]:.0f}x faster than computing them")


if __name__ == "__main__":
    main()
