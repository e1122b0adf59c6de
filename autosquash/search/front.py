"""The Pareto front of finished trials (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether `a` is no worse than `b` in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_indices(points: Sequence[Sequence[float]], feasible: Sequence[bool] | None = None) -> list[int]:
    """Indices of the non-dominated points among the feasible ones, in input order."""
    ok = [i for i in range(len(points)) if feasible is None or feasible[i]]
    return [i for i in ok if not any(dominates(points[j], points[i]) for j in ok if j != i)]
