"""A search asks its sampler for plans no trial has evaluated: repeats are pruned and asked again."""

import optuna

from autosquash.search.space import SearchSpace, params_key
from autosquash.search.study import MAX_REDRAWS, ask_new

# Two plans in all: only the embedding type varies.
SPACE = SearchSpace.model_validate(
    {
        "name": "two",
        "target": "gguf",
        "embed_quant": ["Q8_0", "Q4_0"],
        "attn": {"quant": ["Q8_0"]},
        "ffn": {"quant": ["Q8_0"]},
        "baselines": ["Q8_0"],
    }
)


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))


def test_repeats_are_pruned_until_a_new_plan_comes(tiny_arch):
    study = _study()
    first, _ = ask_new(study, SPACE, tiny_arch, [])
    study.tell(first, [1.0, 1.0])
    second, plan = ask_new(study, SPACE, tiny_arch, [])
    assert params_key(second.params) != params_key(first.params)
    assert plan.embed_quant == second.params["embed_quant"]
    states = [t.state for t in study.trials]
    # The draws between were repeats of the first plan, pruned: neither counted nor shown.
    assert states[0] == optuna.trial.TrialState.COMPLETE and states[-1] == optuna.trial.TrialState.RUNNING
    assert all(s == optuna.trial.TrialState.PRUNED for s in states[1:-1])
    for t in study.trials[1:-1]:
        assert params_key(t.params) == params_key(first.params)


def test_a_running_trial_counts_as_held_and_an_exhausted_space_repeats(tiny_arch):
    study = _study()
    running, _ = ask_new(study, SPACE, tiny_arch, [])
    other, _ = ask_new(study, SPACE, tiny_arch, [running])
    assert params_key(other.params) != params_key(running.params)
    study.tell(running, [1.0, 1.0])
    study.tell(other, [2.0, 2.0])
    before = len(study.trials)
    again, _ = ask_new(study, SPACE, tiny_arch, [])  # nothing new left: the last repeat is evaluated
    assert len(study.trials) - before == MAX_REDRAWS
    assert params_key(again.params) in {params_key(running.params), params_key(other.params)}
