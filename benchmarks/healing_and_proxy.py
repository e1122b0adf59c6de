"""Does healing help, and does the per-trial proxy rank plans as lm-eval does? On real SmolLM2-135M.

1. Three plans of increasing aggressiveness: KL and perplexity on held-out text before and after
   LoRA healing (distilled from the base model on calibration text).
2. Across N plans spread from near-lossless to heavily damaged (uniform Q8_0..Q2_K, FFN-pruned ones,
   random plans of the default search space): Spearman rank correlation between the proxies (KL,
   perplexity) and the lm-eval mean accuracy. Plans that differ by less than lm-eval's sampling
   noise cannot be ranked by it, whatever the proxy; hence the spread and a few hundred examples.

    .venv/bin/python benchmarks/healing_and_proxy.py [--plans 12] [--limit 200] [--tasks a,b] [--skip-healing]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna
import torch
from scipy.stats import spearmanr

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.evaluate.benchmark import mean_accuracy, run_tasks
from autosquash.evaluate.heal import HealConfig, heal
from autosquash.evaluate.proxy import reference, score
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.models.arch import Arch
from autosquash.models.load import load_model, load_tokenizer
from autosquash.search.space import SearchSpace

ROOT = Path(__file__).parents[1]
UNIFORM = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K"]
PRUNED = [("Q4_K", 0.75), ("Q3_K", 0.75), ("Q2_K", 0.875), ("Q4_K", 0.5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--limit", type=int, default=200, help="examples per lm-eval task")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["arc_easy", "piqa", "lambada_openai"])
    p.add_argument("--skip-healing", action="store_true", help="only the proxy/lm-eval agreement")
    p.add_argument("--heal-steps", type=int, default=16)
    args = p.parse_args()
    base, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    arch = Arch.from_config(base.config)
    calib = token_block(tok, load_texts("wikipedia"), 4096, 256)
    stats = collect_stats(base, calib[:8])
    calib_ref, eval_ref = (
        reference(base, calib, 32),
        reference(base, token_block(tok, load_texts("lambada"), 2048, 256), 32),
    )
    cache = VariantCache()
    cfg = HealConfig(steps=args.heal_steps, rank=8, lr=5e-4, batch_seqs=2)

    if not args.skip_healing:
        heal_report(base, arch, stats, cache, calib_ref, eval_ref, cfg)
    print(f"\n2. proxies against lm-eval ({', '.join(args.tasks)}, limit {args.limit}) over {args.plans} plans")
    rows = []
    for name, plan in spread_plans(arch, args.plans):
        model = compress(base, arch, plan, stats, cache)
        proxy = score(model, eval_ref)
        acc = mean_accuracy(run_tasks(model, tok, args.tasks, args.limit))
        rows.append((proxy["kl"], proxy["perplexity"], acc))
        print(
            f"  {name:28s} KL {proxy['kl']:.4f}  ppl {proxy['perplexity']:8.2f}  lm-eval mean acc {acc:.3f}", flush=True
        )
    kl, ppl, acc = zip(*rows, strict=True)
    print(
        f"  Spearman(KL, accuracy) = {spearmanr(kl, acc).statistic:+.2f}   "
        f"Spearman(perplexity, accuracy) = {spearmanr(ppl, acc).statistic:+.2f}   (negative: proxies agree)"
    )


def heal_report(base, arch: Arch, stats, cache: VariantCache, calib_ref, eval_ref, cfg: HealConfig) -> None:
    """Three plans of increasing aggressiveness: held-out KL and perplexity before and after healing."""
    print("1. healing, per plan: held-out KL / perplexity before -> after")
    pruned = {f"blk.{i}.ffn": LayerChoice(quant="Q3_K", ffn_keep_ratio=0.75) for i in range(arch.n_layers)}
    plans = {
        "uniform Q4_0": Plan.uniform(arch, "Q4_0", embed_quant="Q8_0"),
        "uniform Q2_K": Plan.uniform(arch, "Q2_K", embed_quant="Q8_0"),
        "Q3_K + 25% FFN pruned": Plan(embed_quant="Q8_0", groups={**Plan.uniform(arch, "Q3_K").groups, **pruned}),
    }
    for name, plan in plans.items():
        before = score(compress(base, arch, plan, stats, cache), eval_ref)
        t = time.perf_counter()
        healed, _ = heal(compress(base, arch, plan, stats, cache), calib_ref, cfg)
        after = score(healed, eval_ref)
        print(
            f"  {name:24s} KL {before['kl']:.4f} -> {after['kl']:.4f}   ppl {before['perplexity']:7.2f} -> "
            f"{after['perplexity']:7.2f}   ({time.perf_counter() - t:.0f} s healing)"
        )


def spread_plans(arch: Arch, n: int) -> list[tuple[str, Plan]]:
    """`n` plans whose quality spreads from near-lossless to heavily damaged, so that lm-eval's sampling
    noise (about ±0.03 mean accuracy at a few hundred examples) is small against their differences:
    uniform types from Q8_0 to Q2_K, FFN-pruned ones, then random plans of the default search space."""
    plans = [(f"uniform {q}", Plan.uniform(arch, q, embed_quant="Q8_0")) for q in UNIFORM]
    for q, keep in PRUNED:
        ffn = {f"blk.{i}.ffn": LayerChoice(quant=q, ffn_keep_ratio=keep) for i in range(arch.n_layers)}
        plans.append(
            (f"{q}, FFN keep {keep}", Plan(embed_quant="Q8_0", groups={**Plan.uniform(arch, q).groups, **ffn}))
        )
    space = SearchSpace.load(ROOT / "search_spaces/gguf-mixed.yaml")
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    while len(plans) < n:
        plans.append((f"random plan {len(plans)}", space.sample(study.ask(), arch)))
    return plans[:n]


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
