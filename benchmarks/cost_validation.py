"""The phone cost model against published measurements, out of sample (leave one model out).

For each group of autosquash/cost/measurements.yaml (one phone, one runtime), the cost model's speed law
(time per token = bytes read / effective bandwidth + fixed overhead) is fitted on every model but one and the
held-out model's decode speed is predicted; where whole-phone energy is published, energy per token likewise
(bytes * e + MACs * e_mac + static power * predicted time). A group with one model leaves one row out instead.
Bytes read and MACs per token are the cost model's own, from each model's shape and the GGUF types its file is
priced as. Prints per row the measured and predicted values and the error, then the median and worst.

    .venv/bin/python benchmarks/cost_validation.py          # the table
    .venv/bin/python benchmarks/cost_validation.py --json   # {"rows": [...], "out_of_sample_median_error_pct": {...}}

Writes benchmarks/results/cost_validation.txt (the table) unless --json is given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from autosquash.cost.validation import load_measurements, median_abs, validate

ROOT = Path(__file__).parents[1]


def table(preds) -> str:
    head = (
        f"{'group':31s} {'model':29s} {'quant':20s} {'out':5s} {'MiB':>6s} {'file':>6s} "
        f"{'tok/s':>6s} {'pred':>6s} {'err':>7s}  {'J/tok':>5s} {'pred':>5s} {'err':>7s}"
    )
    lines = [head, "-" * len(head)]
    for p in preds:
        energy = (
            f"{p.energy_measured:5.2f} {p.energy_predicted:5.2f} {p.energy_error_pct:+6.1f}%"
            if p.energy_error_pct is not None
            else f"{'-':>5s} {'-':>5s} {'-':>7s}"
        )
        lines.append(
            f"{p.group:31s} {p.model[:29]:29s} {p.quant[:20]:20s} {p.held_out:5s} {p.weights_mb:6.0f} "
            f"{(f'{p.file_mb:.0f}' if p.file_mb else '-'):>6s} {p.decode_measured:6.1f} {p.decode_predicted:6.1f} "
            f"{p.decode_error_pct:+6.1f}%  {energy}"
        )
    return "\n".join(lines)


def summary(preds) -> dict:
    decode = [p.decode_error_pct for p in preds]
    energy = [p.energy_error_pct for p in preds if p.energy_error_pct is not None]
    return {
        "out_of_sample_median_error_pct": {
            "decode_tokens_per_s": median_abs(decode),
            "energy_j_per_token": median_abs(energy),
        },
        "out_of_sample_worst_error_pct": {
            "decode_tokens_per_s": max((abs(v) for v in decode), default=None),
            "energy_j_per_token": max((abs(v) for v in energy), default=None),
        },
        "rows_within_25_pct": {
            "decode_tokens_per_s": f"{sum(abs(v) <= 25 for v in decode)}/{len(decode)}",
            "energy_j_per_token": f"{sum(abs(v) <= 25 for v in energy)}/{len(energy)}",
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for cost_validation.txt")
    args = p.parse_args()
    data = load_measurements()
    preds = validate(data)
    s = summary(preds)
    if args.json:
        rows = [
            {**asdict(x), "decode_error_pct": x.decode_error_pct, "energy_error_pct": x.energy_error_pct} for x in preds
        ]
        print(json.dumps({"rows": rows, **s}, indent=2))
        return
    m, w, n = s["out_of_sample_median_error_pct"], s["out_of_sample_worst_error_pct"], s["rows_within_25_pct"]
    text = "\n".join(
        [
            table(preds),
            "",
            f"decode tok/s out of sample: median |error| {m['decode_tokens_per_s']:.1f} %, worst "
            f"{w['decode_tokens_per_s']:.1f} %, {n['decode_tokens_per_s']} rows within 25 %",
            f"energy J/token out of sample: median |error| {m['energy_j_per_token']:.1f} %, worst "
            f"{w['energy_j_per_token']:.1f} %, {n['energy_j_per_token']} rows within 25 %",
            f"({len(data['rows'])} measured rows, {len({r['soc'] for r in data['rows']})} SoCs, "
            f"{len({r['model'] for r in data['rows']})} models; out: what the fit left out; MiB: the weights as "
            "priced; file: the published file size)",
        ]
    )
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "cost_validation.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
