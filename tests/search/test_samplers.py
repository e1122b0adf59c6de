import optuna
import pytest

from autosquash.search.experiment import Experiment
from autosquash.search.samplers import make_sampler
from autosquash.search.space import SearchSpace

SPACE = SearchSpace.model_validate(
    {
        "name": "t",
        "target": "gguf",
        "attn": {"quant": ["Q8_0", "Q4_0", "Q2_K"]},
        "ffn": {"quant": ["Q8_0", "Q4_0", "Q2_K"], "ffn_keep_ratio": [1.0, 0.5]},
        "baselines": ["Q8_0"],
    }
)
BITS = {"Q8_0": 8.5, "Q4_0": 4.5, "Q2_K": 2.625}


def _search(name: str, arch, constrained: bool, trials: int = 16) -> list[float]:
    """The plan sizes a sampler proposes in a toy ask/tell search, where plans above 15 do not fit."""
    exp = Experiment(name="x", model="m", phone="d", search_space="s", sampler=name, seed=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(exp, trials))
    study.enqueue_trial(SPACE.baseline_params(arch, "Q8_0"))
    sizes = []
    for _ in range(trials):
        trial = study.ask()
        plan = SPACE.sample(trial, arch)
        size = sum(BITS[c.quant] * (c.ffn_keep_ratio if g.endswith("ffn") else 1) for g, c in plan.groups.items())
        error = sum(1 / BITS[c.quant] for c in plan.groups.values())
        if constrained:
            trial.set_constraint("memory_over_limit_mb", size - 15)
        study.tell(trial, [error, size])
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp"])
def test_model_based_samplers_steer_by_the_fit_constraint(name, tiny_arch):
    """The phone-fit constraint a trial sets reaches the sampler: after its random start-up it proposes
    other plans than without it, and no fewer that fit (seeded, so the comparison is exact)."""
    free, constrained = _search(name, tiny_arch, False), _search(name, tiny_arch, True)
    startup = 4  # make_sampler's start-up / first generation at a 16-trial budget
    assert free[:startup] == constrained[:startup]
    assert free[startup:] != constrained[startup:]
    assert sum(s <= 15 for s in constrained[startup:]) >= sum(s <= 15 for s in free[startup:])


def test_random_sampler_runs_ask_tell(tiny_arch):
    sizes = _search("random", tiny_arch, True)
    assert len(sizes) == 16 and len(set(sizes)) > 1


@pytest.mark.parametrize(("budget", "generation", "startup"), [(8, 4, 4), (24, 6, 6), (400, 50, 10)])
def test_samplers_are_sized_for_the_budget(budget, generation, startup):
    def make(name):
        return make_sampler(Experiment(name="x", model="m", phone="d", search_space="s", sampler=name), budget)

    # NSGA-II's default generation of 50 would leave a few-dozen-trial search random throughout.
    assert make("nsga2")._population_size == generation
    assert make("tpe")._n_startup_trials == startup
    assert make("gp")._n_startup_trials == startup
