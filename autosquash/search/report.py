"""The front as a terminal table, and how to browse the results."""

from __future__ import annotations

from pathlib import Path

from autosquash.search.experiment import Experiment


def print_front(front: list[dict], exp: Experiment, out: Path) -> None:
    """Print the Pareto front (smallest memory first) and the command that opens the MLflow UI."""
    print(f"\nPareto front of {exp.name}: {len(front)} plans ({', '.join(exp.objectives)} minimised)")
    print(
        f"{'trial':>5s} {'origin':8s} {'ppl':>9s} {'kl':>8s} {'memory MB':>10s} {'mJ/token':>9s} "
        f"{'tok/s':>7s} {'bits/w':>6s} {'lm-eval':>7s}  plan"
    )
    for r in front:
        acc = r.get("lm_eval_mean_acc")
        print(
            f"{r['trial']:>5} {r['origin']:8s} {float(r['perplexity']):9.3f} {float(r['kl']):8.4f} "
            f"{float(r['memory_mb']):10.1f} {float(r['energy_mj_per_token']):9.3f} "
            f"{float(r['tokens_per_s']):7.1f} {float(r['bits_per_weight']):6.2f} "
            f"{'-' if acc is None else f'{acc:.3f}':>7s}  {r['plan']}"
        )
    if exp.benchmark.tasks:
        print(f"lm-eval: mean accuracy on {', '.join(exp.benchmark.tasks)} (limit {exp.benchmark.limit})")
    print(f"\nAll trials: {out / 'trials.csv'}   front: {out / 'pareto.csv'}")
    print(f"Browse in MLflow: autosquash ui --out {out}   (then open http://127.0.0.1:5000)")
