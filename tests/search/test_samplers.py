import optuna
import pytest

from autosquash.search.experiment import Experiment
from autosquash.search.space import SearchSpace
from autosquash.search.study import make_sampler

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


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random", "gp"])
def test_every_sampler_runs_ask_tell_with_the_fit_constraint(name, tiny_arch):
    exp = Experiment(name="x", model="m", device="d", search_space="s", sampler=name, seed=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(exp, 8))
    study.enqueue_trial(SPACE.baseline_params(tiny_arch, "Q8_0"))
    for _ in range(8):
        trial = study.ask()
        plan = SPACE.sample(trial, tiny_arch)
        size = sum(BITS[c.quant] * (c.ffn_keep_ratio if g.endswith("ffn") else 1) for g, c in plan.groups.items())
        error = sum(1 / BITS[c.quant] for c in plan.groups.values())
        trial.set_constraint("memory_over_limit_mb", size - 30)  # the largest plans do not fit
        study.tell(trial, [error, size])
    assert len(study.trials) == 8
    front = study.best_trials
    # Optuna keeps infeasible plans (constraint > 0) off its front; the search shows them, off the front.
    assert front and all(t.constraints["memory_over_limit_mb"] <= 0 for t in front)


@pytest.mark.parametrize(("budget", "generation", "startup"), [(8, 4, 4), (24, 6, 6), (400, 50, 10)])
def test_samplers_are_sized_for_the_budget(budget, generation, startup):
    def make(name):
        return make_sampler(Experiment(name="x", model="m", device="d", search_space="s", sampler=name), budget)

    # NSGA-II's default generation of 50 would leave a few-dozen-trial search random throughout.
    assert make("nsga2")._population_size == generation
    assert make("tpe")._n_startup_trials == startup
    assert make("gp")._n_startup_trials == startup
