"""Error compensation on the plans a search found: each front plan of a finished search built plain and with
GPTQ compensation (calibration.error_compensation: gptq, its default settings), neither healed, and scored on
the search's test split, which neither the search nor the choice of compensation's settings selected on
(benchmarks/gptq.py chose them on the held-out LAMBADA tokens; the test split is the LAMBADA text after them).

    .venv/bin/python benchmarks/gptq_front.py RUN      # RUN: a search's output folder (its pareto.csv, plans/)

Prints, per front plan: its size, and KL and perplexity on the test split, plain and compensated.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402


def run(folder: Path, every: int) -> dict:
    import torch

    from autosquash.compress.apply import compress
    from autosquash.compress.calibrate import Stats
    from autosquash.compress.plan import Plan
    from autosquash.evaluate.proxy import reference, score
    from autosquash.search.experiment import load_experiment
    from autosquash.search.trial import load_inputs
    from autosquash.yaml_io import load_yaml_model

    exp = load_experiment(folder / "experiment.yaml")
    exp = exp.model_validate(
        {**exp.model_dump(), "calibration": {**exp.calibration.model_dump(), "error_compensation": "gptq"}}
    )
    with (folder / "pareto.csv").open(newline="") as f:
        front = sorted(csv.DictReader(f), key=lambda r: float(r["weights_mb"]))[::every]
    cache = folder / "gptq-front-cache"  # statistics and covariances kept apart from the search's own cache
    t0 = time.perf_counter()
    inputs = load_inputs(exp, cache)
    if inputs.test is None:
        raise SystemExit(f"{folder}: the experiment has no test split to score on")
    setup_s = time.perf_counter() - t0
    plain_stats = Stats(inputs.stats)  # the same E[x²], no compensation
    ref = reference(inputs.base, inputs.test)
    out = {"run": str(folder), "model": exp.model, "test_tokens": inputs.test.numel(), "setup_s": setup_s, "plans": []}
    comp = inputs.stats.compensation
    out["compensation"] = {"tokens": exp.calibration.compensation_tokens, "damp": comp.damp}
    for r in front:
        plan = load_yaml_model(Plan, folder / r["plan"])
        row = {"trial": int(r["trial"]), "weights_mb": float(r["weights_mb"]), "search_test_kl": r.get("test_kl")}
        for name, stats in (("plain", plain_stats), ("gptq", inputs.stats)):
            t1 = time.perf_counter()
            with torch.no_grad():
                model = compress(inputs.base, inputs.arch, plan, stats)
                row[name] = {**score(model, ref), "build_s": time.perf_counter() - t1}
            del model
        out["plans"].append(row)
        print(json.dumps(row), flush=True)
    return out


def report(out: dict) -> str:
    body = [
        [
            p["trial"],
            f"{p['weights_mb']:.1f}",
            f"{p['plain']['kl']:.4f}",
            f"{p['gptq']['kl']:.4f}",
            f"{p['gptq']['kl'] / p['plain']['kl']:.2f}" if p["plain"]["kl"] > 0 else "-",
            f"{p['plain']['perplexity']:.2f}",
            f"{p['gptq']['perplexity']:.2f}",
        ]
        for p in out["plans"]
    ]
    ratios = [p["gptq"]["kl"] / p["plain"]["kl"] for p in out["plans"] if p["plain"]["kl"] > 0]
    lower = sum(p["gptq"]["kl"] < p["plain"]["kl"] for p in out["plans"])
    c = out["compensation"]
    note = (
        f"{out['model']}: the front plans of {out['run']}, unhealed, scored on its test split ({out['test_tokens']} "
        f"tokens the search did not select on). gptq: H over the first {c['tokens']} calibration-source tokens, "
        f"token-normalized, dampening {c['damp']:g}. KL ratio gptq/plain median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); compensation lowered the KL of "
        f"{lower}/{len(out['plans'])} plans."
    )
    return table(["trial", "MB", "KL plain", "KL gptq", "ratio", "ppl plain", "ppl gptq"], body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished search's output folder")
    p.add_argument("--every", type=int, default=1, help="score every k-th front plan by size (default: all)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results", help="folder for gptq_front.txt/json")
    args = p.parse_args()
    out = run(args.run.resolve(), args.every)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gptq_front.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results / "gptq_front.txt").write_text(report(out))
    print(report(out))


if __name__ == "__main__":
    main()
