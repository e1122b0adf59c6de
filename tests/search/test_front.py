from autosquash.search.front import dominates, pareto_indices


def test_front_keeps_non_dominated_feasible_points():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.5), (4.0, 1.0), (0.5, 0.5)]
    assert pareto_indices(pts) == [4]
    assert pareto_indices(pts, [True, True, True, True, False]) == [0, 1, 3]


def test_equal_points_do_not_dominate_each_other():
    assert not dominates((1, 1), (1, 1))
    assert pareto_indices([(1, 1), (1, 1)]) == [0, 1]
