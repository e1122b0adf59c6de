"""Does healing help, and does the per-trial proxy rank plans as lm-eval does? On real SmolLM2-135M.

1. Three plans of increasing aggressiveness: KL and perplexity on held-out text before and after
   LoRA healing (distilled from the base model on calibration text).
2. Across N random plans of the default search space: Spearman rank correlation between the
   proxies (KL, perplexity) and the lm-eval mean accuracy.

    .venv/bin/python benchmarks/healing_and_proxy.py [--plans 10] [--limit 40]
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
TASKS = ["hellaswag", "arc_easy", "piqa"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=10)
    p.add_argument("--limit", type=int, default=40)
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

    print(f"\n2. proxies against lm-eval ({', '.join(TASKS)}, limit {args.limit}) over {args.plans} sampled plans")
    space = SearchSpace.load(ROOT / "search_spaces/gguf-mixed.yaml")
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for _ in range(args.plans):
        plan = space.sample(study.ask(), arch)
        model = compress(base, arch, plan, stats, cache)
        proxy = score(model, eval_ref)
        acc = mean_accuracy(run_tasks(model, tok, TASKS, args.limit))
        rows.append((proxy["kl"], proxy["perplexity"], acc))
        print(f"  KL {proxy['kl']:.4f}  ppl {proxy['perplexity']:8.2f}  lm-eval mean acc {acc:.3f}")
    kl, ppl, acc = zip(*rows, strict=True)
    print(
        f"  Spearman(KL, accuracy) = {spearmanr(kl, acc).statistic:+.2f}   "
        f"Spearman(perplexity, accuracy) = {spearmanr(ppl, acc).statistic:+.2f}   (negative: proxies agree)"
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
