"""What the search benchmarks share: a trial context built as a search builds it, the 2-D hypervolume of
(memory, perplexity) points, and plain-text tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from autosquash.compress.apply import VariantCache
from autosquash.compress.plan import Plan
from autosquash.search.experiment import Experiment
from autosquash.search.outputs import metrics_row
from autosquash.search.trial import SearchInputs, TrialContext, evaluate_plan, load_inputs, prepare_context

ROOT = Path(__file__).parents[1]
DEFAULT_EXPERIMENT = ROOT / "experiments/smollm2-135m-iphone16.yaml"
SMOKE_EXPERIMENT = ROOT / "experiments/smoke.yaml"
OUT = ROOT / "benchmarks/out"


def trial_context(exp: Experiment, out_dir: Path, workers: int) -> tuple[SearchInputs, TrialContext]:
    """Inputs and trial context exactly as `autosquash search` builds them (calibration statistics cached
    under `out_dir`/cache), and this process's torch threads set as one of `workers` trial workers sets them."""
    inputs = load_inputs(exp, out_dir)
    ctx = prepare_context(exp, inputs, workers)
    torch.set_num_threads(ctx.threads_per_worker)
    return inputs, ctx


def evaluate(ctx: TrialContext, plan: Plan, seed: int, cache: VariantCache | None = None) -> dict:
    """One plan built, healed, scored and priced as a trial is; metrics in trials.csv's units too."""
    raw = evaluate_plan(ctx, plan, seed, cache)
    return {**raw, **metrics_row(raw), "fits": bool(raw["fits"])}


def hypervolume_2d(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (both coordinates minimised) and bounded by `ref`, by one sort and sweep.

    Points not strictly better than `ref` in both coordinates add nothing.
    """
    inside = sorted((x, y) for x, y in points if x < ref[0] and y < ref[1])
    area, best_y = 0.0, ref[1]
    for x, y in inside:
        if y < best_y:  # a new step of the front: the strip between y and the best so far, out to ref
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows as aligned text: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
