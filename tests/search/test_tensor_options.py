import itertools
import random

from autosquash.search.tensor_options import pareto_sums


def _sums(parts, picks):
    return sum(parts[j][k][0] for j, k in enumerate(picks)), sum(parts[j][k][1] for j, k in enumerate(picks))


def test_pareto_sums_are_the_combinations_nothing_beats():
    rng = random.Random(0)
    for _ in range(20):
        parts = [[(rng.randrange(1, 50), rng.random()) for _ in range(rng.randrange(1, 5))] for _ in range(3)]
        every = list(itertools.product(*(range(len(p)) for p in parts)))
        found = pareto_sums(parts)
        for picks, nbytes, damage in found:
            assert (nbytes, damage) == _sums(parts, picks)
            beaten = [p for p in every if _sums(parts, p)[0] <= nbytes and _sums(parts, p)[1] < damage - 1e-12]
            assert not beaten
        # Every combination is matched or beaten by one found: nothing the knapsack could want is missing.
        for p in every:
            b, d = _sums(parts, p)
            assert any(nb <= b and nd <= d + 1e-12 for _, nb, nd in found)


def test_pareto_sums_keep_the_combinations_asked_for():
    parts = [[(10, 1.0), (20, 2.0)], [(5, 0.5), (8, 0.1)]]  # (20, 2.0) is beaten by (10, 1.0)
    found = pareto_sums(parts, keep=[(1, 1)])
    assert [p for p, _, _ in found if p == (1, 1)] == [(1, 1)]
    assert all(p[0] == 0 for p, _, _ in found if p != (1, 1))
    assert ((1, 1), 28, 2.1) in [(p, b, round(d, 9)) for p, b, d in found]
