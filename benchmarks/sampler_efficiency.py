"""Search efficiency: hypervolume of (memory, perplexity) against trials for each sampler, at equal budget.

Each (sampler, seed) runs an Optuna study in this process (no Ray, no MLflow) over the experiment's
search space and objectives, with the phone-fit constraint as in a search, but without the enqueued
uniform baselines: the samplers are measured alone. (The sensitivity sampler aims its first proposals
at the baselines' sizes, as it does in a search; it never evaluates them.) A trial is the plan compressed
(one variant cache for every run) and scored on the experiment's held-out text, without healing: healing
is the same for every sampler, so it would only add the same cost to each. A plan seen before is scored
once. The uniform baselines, evaluated the same way, fix one reference point for every run and are drawn
for comparison.

    .venv/bin/python benchmarks/sampler_efficiency.py [--trials 16] [--seeds 0,1,2]
        [--samplers random,tpe,nsga2,sensitivity] [--experiment FILE] [--png FILE]
    .venv/bin/python benchmarks/sampler_efficiency.py --quick   # the smoke model over a small GGUF space
    .venv/bin/python benchmarks/sampler_efficiency.py --from-json benchmarks/out/sampler_efficiency.json

Every run's points are saved as JSON beside the PNG; --from-json prints the table and draws the plot again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import matplotlib
import optuna
from _common import DEFAULT_EXPERIMENT, OUT, SMOKE_EXPERIMENT, evaluate, hypervolume_2d, table, trial_context

from autosquash.compress.apply import VariantCache
from autosquash.compress.plan import Plan
from autosquash.models.arch import Arch
from autosquash.search.experiment import Experiment, HealSpec, load_experiment
from autosquash.search.outputs import OBJECTIVE_METRIC
from autosquash.search.samplers import make_sampler, sensitivity_sampler
from autosquash.search.space import SearchSpace
from autosquash.search.trial import TrialContext, TrialFailed

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

Ref = tuple[float, float]  # the hypervolume's reference point: (memory MB, perplexity)

# --quick: few choices and no decompositions, so that the tiny model's variants are computed in seconds.
QUICK_SPACE = SearchSpace.model_validate(
    {
        "name": "quick",
        "target": "gguf",
        "attn": {"quant": ["Q8_0", "Q4_0", "Q2_K"]},
        "ffn": {"quant": ["Q8_0", "Q4_0", "Q2_K"], "ffn_keep_ratio": [1.0, 0.75]},
        "baselines": ["Q8_0", "Q4_0", "Q2_K"],
    }
)


class Scorer:
    """Scores plans as a trial would, without healing; a plan seen before is not scored again."""

    def __init__(self, ctx: TrialContext):
        self.ctx, self.cache, self.memo = ctx, VariantCache(), {}

    def __call__(self, plan: Plan) -> dict | None:
        key = plan.model_dump_json()
        if key not in self.memo:
            try:
                self.memo[key] = evaluate(self.ctx, plan, 0, self.cache)  # no healing: the seed is unused
            except TrialFailed:  # a plan whose quality is not finite: a failed trial
                self.memo[key] = None
        return self.memo[key]


def run_study(
    exp: Experiment, space: SearchSpace, sampler: optuna.samplers.BaseSampler, trials: int, score: Scorer
) -> tuple[list[tuple[float, float] | None], float]:
    """One study of `trials` trials: each trial's (memory MB, perplexity), None where the plan failed or
    does not fit, and the sampler's mean seconds per trial."""
    study = optuna.create_study(directions=["minimize"] * len(exp.objectives), sampler=sampler)
    points, asking = [], 0.0
    for _ in range(trials):
        t = time.perf_counter()
        trial = study.ask()
        plan = space.sample(trial, score.ctx.arch)
        asking += time.perf_counter() - t
        m = score(plan)
        if m is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            points.append(None)
        else:
            # Feasible when <= 0, as in a search: a plan that does not fit stays off the front.
            trial.set_constraint("memory_over_limit_mb", m["constraint_mb"])
            study.tell(trial, [m[OBJECTIVE_METRIC[o]] for o in exp.objectives])
            points.append((m["memory_mb"], m["perplexity"]) if m["fits"] else None)
    return points, asking / trials


def curve(points: list[tuple[float, float] | None], ref: Ref) -> list[float]:
    """The hypervolume after each trial."""
    return [hypervolume_2d([p for p in points[: n + 1] if p is not None], ref) for n in range(len(points))]


def beaten(points: list[tuple[float, float] | None], baselines: dict[str, tuple[float, float]]) -> list[str]:
    """The baselines some point beats: no more memory and lower perplexity."""
    found = [p for p in points if p is not None]
    return [q for q, (mem, ppl) in baselines.items() if any(m <= mem and y < ppl for m, y in found)]


def baseline_plan(space: SearchSpace, arch: Arch, quant: str) -> Plan:
    """The uniform plan a search enqueues for `quant`."""
    return space.sample(optuna.trial.FixedTrial(space.baseline_params(arch, quant)), arch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", type=Path, default=None, help="default: the default experiment")
    p.add_argument("--trials", type=int, default=None, help="budget per study (default 16; 12 with --quick)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--samplers", type=lambda s: s.split(","), default=["random", "tpe", "nsga2", "sensitivity"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="the smoke experiment's tiny model over a small GGUF space, 12 trials, seeds 0,1 (tests the script)",
    )
    p.add_argument("--png", type=Path, default=OUT / "sampler_efficiency.png")
    p.add_argument("--from-json", type=Path, default=None, help="report the runs saved in this file again")
    args = p.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = measure(args)
        saved = args.png.with_suffix(".json")
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(result, indent=1))
        print(f"runs saved: {saved}")
    report(result)
    plot(result, args.png)
    print(f"plot: {args.png}")


def measure(args: argparse.Namespace) -> dict:
    """Every (sampler, seed) study; the result as JSON-ready data."""
    trials = args.trials or (12 if args.quick else 16)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    exp = load_experiment(args.experiment or (SMOKE_EXPERIMENT if args.quick else DEFAULT_EXPERIMENT))
    exp = exp.model_copy(update={"heal": HealSpec(steps=0)})
    space = QUICK_SPACE if args.quick else SearchSpace.load(exp.search_space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    # One process does everything: all of the machine's threads for it.
    _, ctx = trial_context(exp, OUT, workers=1)
    score = Scorer(ctx)
    print(f"scoring the {len(space.baselines)} uniform baselines (they fix the reference point) ...", flush=True)
    base = {q: score(baseline_plan(space, ctx.arch, q)) for q in space.baselines}
    fixed = {q: (m["memory_mb"], m["perplexity"]) for q, m in base.items() if m is not None and m["fits"]}
    ref = (1.05 * max(x for x, _ in fixed.values()), 1.05 * max(y for _, y in fixed.values()))
    if "sensitivity" in args.samplers:
        t = time.perf_counter()
        sensitivity_sampler(exp, space, ctx, OUT)  # the profile: measured once, then read from OUT/cache
        print(f"sensitivity profile ready in {time.perf_counter() - t:.1f} s (once per model, data and space)")

    # Sampler parameters as a search of this budget has them (driver.make_sampler): until the end of
    # TPE's start-up or NSGA-II's first generation, each draws at random.
    tpe, nsga2 = (make_sampler(exp.model_copy(update={"sampler": s}), trials) for s in ("tpe", "nsga2"))
    runs: dict[str, list] = {name: [] for name in args.samplers}
    for name in args.samplers:
        for seed in seeds:
            run = exp.model_copy(update={"seed": seed, "sampler": name})
            sampler = sensitivity_sampler(run, space, ctx, OUT) if name == "sensitivity" else make_sampler(run, trials)
            t = time.perf_counter()
            points, asking = run_study(run, space, sampler, trials, score)
            runs[name].append({"seed": seed, "points": points, "ask_s": asking})
            print(
                f"  {name:11s} seed {seed}: hypervolume {curve(points, ref)[-1]:10.1f} after {trials} trials,"
                f" beats {len(beaten(points, fixed))} of {len(fixed)} baselines ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    return {
        "experiment": exp.name,
        "trials": trials,
        "seeds": seeds,
        "reference": ref,
        "baselines": fixed,
        "plans_scored": len(score.memo),
        "tpe_startup": tpe._n_startup_trials,
        "nsga2_generation": nsga2._population_size,
        "runs": runs,
    }


def report(result: dict) -> None:
    """The table: hypervolume at a quarter, half, three quarters and all of the budget, and the uniform
    baselines beaten (a fitting plan with no more memory and lower perplexity) in the whole budget."""
    trials, seeds, ref = result["trials"], result["seeds"], tuple(result["reference"])
    fixed = {q: tuple(p) for q, p in result["baselines"].items()}
    marks = sorted({max(1, trials * k // 4) for k in (1, 2, 3, 4)})
    print(
        f"\n{result['experiment']}: hypervolume of (memory MB, perplexity) in MB x perplexity after n trials, "
        f"mean (min..max) over seeds {','.join(map(str, seeds))}"
    )
    print(
        "objectives as the experiment's, with the phone-fit constraint; no healing (the same for every sampler);"
        f" reference point ({ref[0]:.1f} MB, {ref[1]:.2f}) = 1.05 x the uniform baselines' largest"
    )
    rows = []
    for name, runs in result["runs"].items():
        hvs = [curve(r["points"], ref) for r in runs]
        cells = [name]
        for n in marks:
            at = [hv[n - 1] for hv in hvs]
            cells.append(f"{statistics.mean(at):.1f} ({min(at):.1f}..{max(at):.1f})")
        wins = [len(beaten(r["points"], fixed)) for r in runs]
        cells.append(f"{statistics.mean(wins):.1f} ({min(wins)}..{max(wins)}) of {len(fixed)}")
        rows.append([*cells, f"{statistics.mean(r['ask_s'] for r in runs) * 1e3:.1f}"])
    base_hv = hypervolume_2d(list(fixed.values()), ref)
    rows.append(["uniform baselines", *[f"{base_hv:.1f}"] * len(marks), "-", "-"])
    print(table(["sampler", *[f"n = {n}" for n in marks], "baselines beaten", "sampler ms/trial"], rows))
    print(
        "uniform baselines: the search space's uniform plans, evaluated the same way but never shown to the"
        f" samplers; {result['plans_scored']} distinct plans scored in all"
    )
    for name, runs in result["runs"].items():
        counts = {q: sum(q in beaten(r["points"], fixed) for r in runs) for q in fixed}
        wins = ", ".join(f"{q} in {c} of {len(runs)} runs" for q, c in counts.items() if c)
        print(f"  {name} beat {wins or 'no baseline'}")
    print(
        f"tpe draws its first {result['tpe_startup']} trials at random and nsga2 its first generation of"
        f" {result['nsga2_generation']}: until then each matches random with the same seed"
    )


def plot(result: dict, path: Path) -> None:
    """Mean hypervolume per sampler against trials, with the min..max band over seeds."""
    trials, ref = result["trials"], tuple(result["reference"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = list(range(1, trials + 1))
    for name, runs in result["runs"].items():
        hvs = [curve(r["points"], ref) for r in runs]
        mean = [statistics.mean(hv[i] for hv in hvs) for i in range(trials)]
        line = ax.plot(x, mean, label=name)[0]
        lo = [min(hv[i] for hv in hvs) for i in range(trials)]
        hi = [max(hv[i] for hv in hvs) for i in range(trials)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    base_hv = hypervolume_2d([tuple(p) for p in result["baselines"].values()], ref)
    ax.axhline(base_hv, color="grey", linestyle="--", label="uniform baselines")
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume (MB x perplexity)")
    ax.set_title(
        f"{result['experiment']}: seeds {','.join(map(str, result['seeds']))},"
        f" reference ({ref[0]:.0f} MB, ppl {ref[1]:.1f})",
        fontsize=10,
    )
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
