"""`autosquash search --model M --phone P`: the default experiment for the user's model and phone, over the space
the model's widths and family take, recorded in its folder so that --resume finds the same search."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import optuna
import pytest

import autosquash.search.study as study_module
from autosquash.cli import main
from autosquash.errors import AutosquashError
from autosquash.search.experiment import load_experiment
from autosquash.search.model_experiment import (
    DEFAULT_EXPERIMENT,
    FULL_LADDER_SPACE,
    experiment_name,
    model_experiment,
    write_space,
)
from autosquash.search.record import check_same_experiment
from autosquash.search.space import SearchSpace
from autosquash.search.study import SearchOptions, _preflight
from autosquash.yaml_io import dump_yaml_model

ROOT = Path(__file__).parents[2]
TINY_LLAMA = ROOT / "experiments/tiny-llama.json"  # widths 256 and 512: every K-quant fits


def _config(tmp_path: Path, name: str, **changes) -> Path:
    """A tiny config.json: tiny-llama's with `changes`, in a folder of its own."""
    path = tmp_path / name / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(json.loads(TINY_LLAMA.read_text()) | changes))
    return path


def test_the_default_experiment_for_another_model_and_phone(tmp_path):
    default = load_experiment(DEFAULT_EXPERIMENT)
    made = model_experiment(str(TINY_LLAMA), "pixel-9-pro")
    exp = made.experiment
    assert (exp.name, exp.model, exp.phone) == ("tiny-llama-pixel-9-pro", str(TINY_LLAMA), "pixel-9-pro")
    assert made.space is None and made.note is None and made.in_folder(tmp_path) == exp
    assert exp.search_space == str(FULL_LADDER_SPACE)  # 256-value super-blocks fit every row
    # everything else is the default experiment's
    same = {"name", "model", "phone", "search_space"}
    assert exp.model_dump(exclude=same) == default.model_dump(exclude=same)
    assert model_experiment(str(TINY_LLAMA), None).experiment.phone == default.phone


def test_a_model_whose_rows_take_no_k_quant_searches_the_default_space(tmp_path):
    config = _config(tmp_path, "Narrow-Llama", hidden_size=192, intermediate_size=512, head_dim=48)
    made = model_experiment(str(config), "iphone-16")
    assert made.experiment.search_space == load_experiment(DEFAULT_EXPERIMENT).search_space
    assert made.experiment.name == "narrow-llama-iphone-16" and made.space is None
    # the FFN's rows alone (down_proj's, 320 wide) are enough to fall back
    config = _config(tmp_path, "Wide", intermediate_size=320)
    assert model_experiment(str(config), "iphone-16").experiment.search_space != str(FULL_LADDER_SPACE)


def test_a_family_whose_graph_sizes_every_block_alike_gets_the_space_without_pruning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _config(tmp_path, "tiny-qwen3", model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    made = model_experiment("tiny-qwen3/config.json", "iphone-16")  # a path from the working folder
    assert made.experiment.model == str(tmp_path / "tiny-qwen3/config.json")
    ladder = SearchSpace.load(FULL_LADDER_SPACE)
    assert made.experiment.search_space == str(FULL_LADDER_SPACE) and ladder.pruned() == ["ffn.ffn_keep_ratio"]
    assert made.space.pruned() == [] and made.space.ffn.ffn_keep_ratio == [1.0]
    assert made.space.ffn.quant == ladder.ffn.quant and made.space.baselines == ladder.baselines
    assert "ffn.ffn_keep_ratio" in made.note and "qwen3" in made.note and "\n" not in made.note

    out = tmp_path / "run"
    exp = made.in_folder(out)
    assert exp.search_space == str(out / "search_space.yaml")
    write_space(made, out)
    assert SearchSpace.load(exp.search_space) == made.space
    # the preflight that refuses the full ladder for qwen3 passes the derived space
    _preflight(exp, SearchOptions(out_dir=out, trials=2, workers=1))
    with pytest.raises(AutosquashError, match="offers no per-block pruning"):
        _preflight(made.experiment, SearchOptions(out_dir=out, trials=2, workers=1))


def test_resuming_a_derived_search_finds_the_same_experiment_and_space(tmp_path):
    config = _config(tmp_path, "tiny-qwen3", model_type="qwen3")
    out = tmp_path / "run"
    made = model_experiment(str(config), "iphone-16")
    write_space(made, out)
    digest = hashlib.sha256((out / "search_space.yaml").read_bytes()).hexdigest()
    dump_yaml_model(made.in_folder(out), out / "experiment.yaml")  # as run_search records it

    again = model_experiment(str(config), "iphone-16")
    write_space(again, out)
    assert hashlib.sha256((out / "search_space.yaml").read_bytes()).hexdigest() == digest
    assert check_same_experiment(again.in_folder(out), out) == []
    assert load_experiment(out / "experiment.yaml") == again.in_folder(out)  # the file alone resumes it too
    other = model_experiment(str(config), "pixel-9-pro").in_folder(out)
    assert check_same_experiment(other, out, force=True) == ["name", "phone"]


def test_resume_from_the_command_line_passes_the_experiment_check(tmp_path, capsys):
    config = _config(tmp_path, "tiny-qwen3", model_type="qwen3")
    out = tmp_path / "run"
    argv = ["search", "--model", str(config), "--phone", "iphone-16", "--out", str(out)]
    made = model_experiment(str(config), "iphone-16")
    out.mkdir()
    dump_yaml_model(made.in_folder(out), out / "experiment.yaml")
    study = optuna.create_study(study_name=made.experiment.name, storage=f"sqlite:///{out / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    study.set_user_attr("search_space_sha256", "0" * 64)
    # the experiment is the one stored; the space's record (here made to differ) is what stops it
    assert main([*argv, "--resume"]) == 2
    out_text, err = capsys.readouterr()
    assert "changed since" in err and "another experiment" not in err
    assert "pruning (ffn.ffn_keep_ratio) left out" in out_text


def test_search_takes_model_and_phone_without_an_experiment_file(tmp_path, capsys, monkeypatch):
    ran = {}

    def stop(exp, opts):
        ran.update(exp=exp, opts=opts, space=SearchSpace.load(exp.search_space) if exp.search_space else None)
        raise AutosquashError("stopped before the search")

    monkeypatch.setattr(study_module, "run_search", stop)
    config = _config(tmp_path, "tiny-qwen3", model_type="qwen3")
    out = tmp_path / "run"
    code = main(["search", "--model", str(config), "--phone", "pixel-9-pro", "--trials", "3", "--out", str(out)])
    assert code == 2
    exp, opts = ran["exp"], ran["opts"]
    assert (exp.name, exp.phone, opts.trials, opts.out_dir) == ("tiny-qwen3-pixel-9-pro", "pixel-9-pro", 3, out)
    assert ran["space"].pruned() == [] and Path(exp.search_space).parent == out
    assert not out.exists()  # a start refused before its search began leaves no folder
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "pruning (ffn.ffn_keep_ratio) left out of gguf-full-ladder" in printed

    # with an experiment file, --phone and --model override its own
    smoke = str(ROOT / "experiments/smoke.yaml")
    assert main(["search", smoke, "--phone", "pixel-9-pro", "--model", str(config), "--out", str(out)]) == 2
    exp = ran["exp"]
    assert (exp.name, exp.phone, exp.model) == ("smoke", "pixel-9-pro", str(config))
    assert exp.search_space == str(ROOT / "search_spaces/torch-small.yaml")


def test_search_with_neither_an_experiment_nor_a_model_is_one_line(capsys):
    assert main(["search", "--phone", "iphone-16"]) == 2
    err = capsys.readouterr().err
    assert "search needs an experiment file" in err and "--model" in err and err.count("\n") == 1


def test_an_unknown_phone_or_model_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--model", str(TINY_LLAMA), "--phone", "nokia-3310", "--out", str(out)]) == 2
    assert "unknown phone 'nokia-3310'" in capsys.readouterr().err
    assert main(["search", "--model", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "phone", "name"),
    [
        ("smollm2-135m", "iphone-16", "smollm2-135m-iphone-16"),
        ("Qwen/Qwen2.5-1.5B-Instruct", "pixel-9-pro", "qwen2.5-1.5b-instruct-pixel-9-pro"),
        ("/models/Llama-3.2-1B/config.json", "My Phone", "llama-3.2-1b-my-phone"),
        ("/models/SmolLM2 Q4_K_M.gguf", "iphone-16", "smollm2-q4_k_m-iphone-16"),
    ],
)
def test_experiment_names_are_valid_and_say_model_and_phone(model, phone, name):
    assert experiment_name(model, phone) == name
