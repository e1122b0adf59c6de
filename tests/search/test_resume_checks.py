"""--resume refuses a search folder that another experiment, or another search space, filled, and settles what a
killed driver left."""

from pathlib import Path

import optuna

from autosquash.cli import main
from autosquash.search.experiment import load_experiment
from autosquash.yaml_io import dump_yaml_model

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "experiments/smoke.yaml"


def _stored_search(out: Path, space_digest: str | None = None, **changes) -> None:
    """A search folder as a stopped search leaves it: its study (one finished trial) and its experiment file."""
    out.mkdir()
    exp = load_experiment(SMOKE)
    dump_yaml_model(exp.model_copy(update=changes), out / "experiment.yaml")
    study = optuna.create_study(study_name=exp.name, storage=f"sqlite:///{out / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    if space_digest:
        study.set_user_attr("search_space_sha256", space_digest)


def test_resume_with_another_experiment_is_refused_naming_what_differs(tmp_path, capsys):
    out = tmp_path / "run"
    _stored_search(out, sampler="random", seed=7)
    assert main(["search", str(SMOKE), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was searched with another experiment (sampler, seed differ)" in err and err.count("\n") == 1
    assert not (out / "mlflow.db").exists()  # refused before any work


def test_resume_with_more_trials_or_workers_is_allowed_past_the_check(tmp_path, capsys):
    out = tmp_path / "run"
    _stored_search(out, space_digest="0" * 64, trials=3, workers=1)
    # Trials and workers may change; the (changed) search space is what stops this one.
    assert main(["search", str(SMOKE), "--out", str(out), "--resume", "--trials", "9", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "another experiment" not in err


def test_force_resumes_past_a_changed_experiment_naming_the_changes(tmp_path, capsys):
    from autosquash.search.record import check_same_experiment

    out = tmp_path / "run"
    _stored_search(out, sampler="random", seed=7)
    assert check_same_experiment(load_experiment(SMOKE), out, force=True) == ["sampler", "seed"]
    assert check_same_experiment(load_experiment(out / "experiment.yaml"), out) == []
    # --force alone is no resume: one line, nothing run.
    assert main(["search", str(SMOKE), "--out", str(tmp_path / "new"), "--force"]) == 2
    assert "--force only applies to --resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_plan_cut_off_while_its_parameters_were_set_is_asked_again_whole(tmp_path):
    # A driver killed while it filled in an enqueued plan (a uniform baseline) left it RUNNING with only some
    # parameters set: the plan asked again is the whole enqueued one, not those parameters plus new draws.
    from types import SimpleNamespace

    from autosquash.search.record import recover_stale

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])
    baseline = {"embed_quant": "Q4_0", "blk.0.attn.quant": "Q4_0", "blk.0.ffn.quant": "Q4_0"}
    study.enqueue_trial(baseline, user_attrs={"origin": "baseline"})
    cut = study.ask()
    cut.suggest_categorical("embed_quant", ["Q8_0", "Q4_0"])  # one of three set when the driver died
    exp = load_experiment(SMOKE)
    recover_stale(study, exp, SimpleNamespace(trial_runs={}), tmp_path)
    again = study.ask()
    assert again.number == 1 and again.user_attrs["origin"] == "baseline"
    for name, value in baseline.items():
        assert again.suggest_categorical(name, ["Q8_0", "Q4_0"]) == value
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
