"""A search asks its sampler for plans no trial has evaluated: repeats are pruned and asked again, and a space
whose every plan has been tried asks nothing more."""

import csv
from pathlib import Path

import optuna
import pytest

from autosquash.cli import main
from autosquash.search.record import MAX_REDRAWS, ask_new
from autosquash.search.space import SearchSpace, params_key
from tests.conftest import write_experiment

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


def test_a_running_trial_counts_as_held_and_an_exhausted_space_asks_nothing(tiny_arch):
    study = _study()
    running, _ = ask_new(study, SPACE, tiny_arch, [])
    other, _ = ask_new(study, SPACE, tiny_arch, [running])
    assert params_key(other.params) != params_key(running.params)
    assert ask_new(study, SPACE, tiny_arch, [running, other]) is None  # both plans are running
    study.tell(running, [1.0, 1.0])
    study.tell(other, state=optuna.trial.TrialState.FAIL)  # a failed plan has been tried too
    before = len(study.trials)
    assert ask_new(study, SPACE, tiny_arch, []) is None  # nothing new left: nothing asked, nothing pruned
    assert len(study.trials) == before


class _Stuck(optuna.samplers.RandomSampler):
    """A sampler that proposes the first option of every parameter, for ever (a TPE sure of its favourite)."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        return param_distribution.choices[0]


def test_a_sampler_that_only_repeats_itself_gets_an_untried_plan_after_max_redraws(tiny_arch):
    space = SearchSpace.model_validate(
        {"name": "four", "target": "gguf", "attn": {"quant": ["Q8_0", "Q4_0"]}, "ffn": {"quant": ["Q8_0"]}}
    )
    assert space.plan_count(tiny_arch) == 4  # blk.0.attn and blk.1.attn, two types each
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_Stuck(seed=0))
    keys = set()
    for n in range(4):
        trial, plan = ask_new(study, space, tiny_arch, [])
        assert plan.choice("blk.0.attn").quant == trial.params["blk.0.attn.quant"]
        keys.add(params_key(trial.params))
        study.tell(trial, [float(n), 1.0])
    assert len(keys) == 4  # every plan of the space, though the sampler proposed one
    origins = [t.user_attrs.get("origin") for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert origins == [None, "random", "random", "random"]
    assert len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,))) == 3 * MAX_REDRAWS
    assert ask_new(study, space, tiny_arch, []) is None


def test_the_plans_of_a_space_are_counted_and_told_from_others(tiny_arch):
    assert SPACE.plan_count(tiny_arch) == 2
    assert SPACE.options(tiny_arch) == {"embed_quant": ["Q8_0", "Q4_0"]}
    assert SPACE.holds(params_key({"embed_quant": "Q4_0"}), tiny_arch)
    assert not SPACE.holds(params_key({"embed_quant": "Q6_K"}), tiny_arch)  # a plan of another space
    assert not SPACE.holds(params_key({"embed_quant": "Q4_0", "blk.0.attn.quant": "Q4_0"}), tiny_arch)


@pytest.mark.integration
def test_a_search_of_a_space_smaller_than_its_budget_stops_with_its_front_scored(tmp_path, capsys):
    """Four plans (two types for each attention group of the 2-block tiny Llama) and six trials asked for: the
    search stops once every plan is tried, says so, and scores and writes its front as any search does (it ended
    in Optuna's UpdateFinishedTrialError once a pruned redraw was evaluated)."""
    space = {"name": "four", "target": "gguf", "attn": {"quant": ["Q8_0", "Q4_0"]}, "ffn": {"quant": ["Q8_0"]}}
    tiny = str(Path(__file__).parents[2] / "experiments/tiny-llama.json")
    exp = write_experiment(tmp_path, tiny, space | {"baselines": ["Q8_0"]}, trials=6, name="four")
    out = tmp_path / "out"
    assert main(["search", str(exp), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the search space holds only 4 distinct plans, every one tried: the search stops after 4 of its 6" in printed
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    assert len({(out / r["plan"]).read_text() for r in rows}) == 4
    with (out / "pareto.csv").open() as f:
        front = list(csv.DictReader(f))
    assert front and all(r["test_kl"] for r in front)  # scored on the test split, as every finished search's front
