"""A finished search's plans against every uniform GGUF type and llama.cpp's Q4_K_M / Q3_K_M mixtures.

Reads the search in --run (trials.csv holds the uniform baselines, evaluated as trials; pareto.csv the
front with its lm-eval accuracy). The llama.cpp mixtures, and one uniform baseline as a check that the
numbers agree with the recorded ones, are evaluated in this process exactly as a trial is: the same
context, healing and torch threads, through `runner.evaluate_plan`. Then, for every uniform type and
mixture, the best searched plan no larger, and the hypervolume of (memory, perplexity) with and without
the baselines.

    .venv/bin/python benchmarks/front_vs_uniform.py [--run runs/default]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from _common import ROOT, evaluate, hypervolume_2d, table, trial_context

from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.compress.recipes import MIXTURES, llama_cpp_mixture
from autosquash.models.arch import Arch
from autosquash.search.experiment import Experiment, load_experiment
from autosquash.yaml_io import load_yaml_model

SEARCH_COMMAND = ".venv/bin/autosquash search experiments/smollm2-135m-iphone16.yaml --out runs/default"


def deployed_mix(arch: Arch, plan: Plan) -> str:
    """The GGUF types a plan's tensors really get, with their counts, e.g. 'Q5_0 150, Q8_0 31'."""
    counts: dict[str, int] = {}
    for t in deployed_tensors(arch, plan):
        if len(t.shape) == 2:
            counts[t.type] = counts.get(t.type, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def read_run(run: Path) -> tuple[list[dict], dict[int, float | None]]:
    """The finished trials of a search, and its front: trial -> lm-eval mean accuracy (None if not run).
    Exits with one line if `run` holds no finished search."""
    rows = []
    if (run / "experiment.yaml").exists() and (run / "trials.csv").exists():
        with (run / "trials.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE"]
    if not rows:
        sys.exit(f"{run} holds no finished search; run the README's default search first: {SEARCH_COMMAND}")
    for r in rows:
        r.update(trial=int(r["trial"]), fits=r["fits"] == "True")
        for k in ("perplexity", "kl", "memory_mb", "bits_per_weight"):
            r[k] = float(r[k])
    front = {}
    if (run / "pareto.csv").exists():
        with (run / "pareto.csv").open() as f:
            front = {int(r["trial"]): float(r.get("lm_eval_mean_acc") or "nan") for r in csv.DictReader(f)}
    return rows, front


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs/default", help="a finished search's output folder")
    args = p.parse_args()
    rows, front = read_run(args.run)
    exp = load_experiment(args.run / "experiment.yaml")
    baselines = [r for r in rows if r["origin"] == "baseline"]
    searched = [r for r in rows if r["origin"] != "baseline" and r["fits"]]
    for r in baselines:
        r["name"] = f"uniform {load_yaml_model(Plan, args.run / r['plan']).groups['blk.0.ffn'].quant}"

    # The context a trial of this search got; torch threads as on one of its workers.
    _, ctx = trial_context(exp, args.run, exp.workers)
    check = next((r for r in baselines if r["name"] in ("uniform Q4_K", "uniform Q4_0")), baselines[-1])
    print(f"evaluating {check['name']} again and the llama.cpp mixtures, as trials are ...", flush=True)
    # A trial heals with the seed experiment seed + trial number (driver._loop); a mixture with the seed alone.
    again = evaluate(ctx, load_yaml_model(Plan, args.run / check["plan"]), exp.seed + check["trial"])
    mixtures = []
    for name in MIXTURES:
        plan = llama_cpp_mixture(ctx.arch, name)
        mixtures.append({"name": f"llama.cpp {name}", **evaluate(ctx, plan, exp.seed)})
        print(f"  {name}: deployed as {deployed_mix(ctx.arch, plan)}", flush=True)

    print(f"\n{exp.name}: {len(rows)} finished trials in {args.run}, {len(searched)} of them searched plans that fit")
    d = again["perplexity"] - check["perplexity"]
    print(
        f"check: {check['name']} (trial {check['trial']}) evaluated again in this process: perplexity "
        f"{check['perplexity']:.4f} recorded, {again['perplexity']:.4f} now ({d / check['perplexity']:+.3%}); "
        f"memory {check['memory_mb']:.3f} MB recorded, {again['memory_mb']:.3f} MB now"
    )
    print_front(rows, front, exp)
    print_matched([*baselines, *mixtures], searched, front)
    print_hypervolume([r for r in [*baselines, *mixtures] if r["fits"]], searched)


def print_front(rows: list[dict], front: dict[int, float | None], exp: Experiment) -> None:
    print(f"\nThe searched front ({len(front)} plans; {', '.join(exp.objectives)} minimised)")
    out = [
        [r["trial"], r["origin"], f"{r['memory_mb']:.1f}", f"{r['bits_per_weight']:.2f}"]
        + [f"{r['perplexity']:.2f}", f"{r['kl']:.4f}", _acc(front[r["trial"]])]
        for r in sorted((r for r in rows if r["trial"] in front), key=lambda r: r["memory_mb"])
    ]
    print(table(["trial", "origin", "memory MB", "bits/w", "ppl", "kl", "lm-eval"], out))
    if exp.benchmark.tasks:
        print(f"lm-eval: mean accuracy on {', '.join(exp.benchmark.tasks)} (limit {exp.benchmark.limit})")


def print_matched(fixed: list[dict], searched: list[dict], front: dict[int, float | None]) -> None:
    """Each uniform type and mixture against the searched plan of least perplexity in no more memory."""
    print("\nAt matched memory: each uniform type and llama.cpp mixture against the best searched plan no larger")
    out = []
    for r in sorted(fixed, key=lambda r: -r["memory_mb"]):
        fitting = [s for s in searched if s["memory_mb"] <= r["memory_mb"]]
        cells = [r["name"], f"{r['memory_mb']:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['perplexity']:.2f}"]
        if not fitting:
            out.append(cells + ["-"] * 5)
            continue
        best = min(fitting, key=lambda s: s["perplexity"])
        gain = r["perplexity"] - best["perplexity"]
        cells += [best["trial"], f"{best['memory_mb']:.1f}", f"{best['perplexity']:.2f}"]
        out.append(cells + [_acc(front.get(best["trial"])), f"{gain:+.2f} ({gain / r['perplexity']:+.1%})"])
    headers = ["plan", "memory MB", "bits/w", "ppl", "searched trial", "memory MB", "ppl", "lm-eval", "ppl gain"]
    print(table(headers, out))
    print(
        "ppl gain: the plan's perplexity less the searched plan's (positive: the search does better in no more"
        " memory); lm-eval only for front plans"
    )


def print_hypervolume(fixed: list[dict], searched: list[dict]) -> None:
    """Hypervolume of (memory, perplexity) of the fixed recipes, the searched plans, and both."""
    sets = {"uniform types + llama.cpp mixtures": fixed, "searched plans": searched, "all": [*fixed, *searched]}
    every = sets["all"]
    ref = (1.05 * max(r["memory_mb"] for r in every), 1.05 * max(r["perplexity"] for r in every))
    print(
        f"\nHypervolume of (memory MB, perplexity), both minimised, in MB x perplexity; reference point "
        f"({ref[0]:.1f} MB, {ref[1]:.2f}) = 1.05 x the largest of each among all these plans"
    )
    hv = {k: hypervolume_2d([(r["memory_mb"], r["perplexity"]) for r in v], ref) for k, v in sets.items()}
    base = hv["uniform types + llama.cpp mixtures"]
    out = [[k, len(sets[k]), f"{v:.1f}", f"{v / base - 1:+.1%}" if base else "-"] for k, v in hv.items()]
    print(table(["plans", "n", "hypervolume", "vs uniform + mixtures"], out))


def _acc(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


if __name__ == "__main__":
    main()
