"""The tables a search writes from its study, and the front it prints at the end."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest

from autosquash.search.experiment import BenchmarkSpec, Experiment
from autosquash.search.outputs import COLUMNS, INTERRUPTED, print_front, write_tables


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _complete(study: optuna.Study, ppl: float, memory_mb: float, over_limit_mb: float) -> int:
    """One finished trial, stored as search.record's `record` stores it (user attributes, constraint, values)."""
    trial = study.ask()
    trial.set_user_attr("origin", "sampled")
    trial.set_user_attr("plan", f"plans/trial-{trial.number:04d}.yaml")
    trial.set_user_attr("worker", "w0")
    metrics = {
        "perplexity": ppl,
        "kl": ppl / 100,
        "memory_mb": memory_mb,
        "energy_mj_per_token": memory_mb / 10,
        "tokens_per_s": 1000 / memory_mb,
        "weights_mb": memory_mb * 0.8,
        "trial_s": 1.5,
        "constraint_mb": over_limit_mb,
    }
    for k, v in metrics.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("bits_per_weight", 4.5)
    trial.set_user_attr("block_bits_per_weight", 4.25)
    trial.set_user_attr("fits", over_limit_mb <= 0)
    trial.set_constraint("memory_over_limit_mb", over_limit_mb)
    study.tell(trial, [ppl, memory_mb])
    return trial.number


def _failed(study: optuna.Study, error: str) -> int:
    trial = study.ask()
    trial.set_user_attr("origin", "sampled")
    trial.set_user_attr("plan", f"plans/trial-{trial.number:04d}.yaml")
    trial.set_user_attr("error", error)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return trial.number


@pytest.fixture
def study() -> optuna.Study:
    s = optuna.create_study(directions=["minimize", "minimize"])  # in memory
    _complete(s, ppl=20.0, memory_mb=100.0, over_limit_mb=-50.0)  # 0: on the front
    _complete(s, ppl=30.0, memory_mb=60.0, over_limit_mb=-90.0)  # 1: on the front, the smallest
    _complete(s, ppl=10.0, memory_mb=200.0, over_limit_mb=50.0)  # 2: would lead on quality, but does not fit
    _complete(s, ppl=40.0, memory_mb=120.0, over_limit_mb=-30.0)  # 3: dominated by 0
    _failed(s, "RuntimeError: out of memory")  # 4: a failed trial counts
    interrupted = _failed(s, "stopped")  # 5: a driver stop, asked again, so it does not count
    s.set_user_attr(INTERRUPTED, [interrupted])
    return s


def test_trials_csv_holds_every_counted_trial(study, tmp_path):
    rows, _ = write_tables(study, tmp_path)
    table = _rows(tmp_path / "trials.csv")
    assert list(table[0]) == COLUMNS
    assert [r["trial"] for r in table] == ["0", "1", "2", "3", "4"] and len(rows) == 5
    assert [r["state"] for r in table] == ["COMPLETE"] * 4 + ["FAIL"]
    assert table[2]["fits"] == "False" and float(table[2]["perplexity"]) == 10.0  # infeasible, still listed
    assert table[4]["error"] == "RuntimeError: out of memory" and table[4]["perplexity"] == ""


def test_pareto_csv_holds_the_feasible_non_dominated_trials_smallest_first(study, tmp_path):
    _, front = write_tables(study, tmp_path)
    table = _rows(tmp_path / "pareto.csv")
    assert [r["trial"] for r in table] == ["1", "0"]
    assert [float(r["memory_mb"]) for r in table] == [60.0, 100.0]
    assert [r["trial"] for r in front] == [1, 0]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, none left behind


def _experiment(tasks: list[str]) -> Experiment:
    return Experiment(
        name="demo",
        model="tiny-llama.json",
        phone="iphone-16",
        search_space="s.yaml",
        benchmark=BenchmarkSpec(tasks=tasks, limit=5),
    )


def test_print_front_shows_a_line_per_plan_and_the_ui_command(study, tmp_path, capsys):
    _, front = write_tables(study, tmp_path)
    front[0]["lm_eval_mean_acc"] = 0.61234  # the front's benchmark, as the search adds it
    front[1]["lm_eval_mean_acc"] = None  # a benchmark that failed
    front[0].update(test_perplexity=61.5, test_kl=0.0421)  # the test split's, as the search adds them
    print_front(front, _experiment(["piqa"]), tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Pareto front of demo: 2 plans (perplexity, memory minimised)"
    heads = "trial origin ppl kl test ppl test kl memory MB mJ/token tok/s bits/w lm-eval plan"
    assert lines[1].split() == heads.split()
    first, second = lines[2].split(), lines[3].split()
    assert first[:2] == ["1", "sampled"] and first[4:6] == ["61.500", "0.0421"] and first[6] == "60.0"
    assert first[-2:] == ["0.612", "plans/trial-0001.yaml"]
    assert (
        second[:2] == ["0", "sampled"] and second[4:6] == ["-", "-"] and second[-2:] == ["-", "plans/trial-0000.yaml"]
    )
    assert lines[4].startswith("ppl, kl: the evaluation set the search selected on; test ppl, test kl: held-out")
    assert lines[5] == "lm-eval: mean accuracy on piqa (limit 5)"
    assert lines[-1].startswith(f"Browse in MLflow: autosquash ui --out {tmp_path}")


def test_print_front_without_a_benchmark_shows_dashes(study, tmp_path, capsys):
    _, front = write_tables(study, tmp_path)
    print_front(front, _experiment([]), tmp_path)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2 and all(r[-2] == "-" for r in rows)
    assert "lm-eval: mean accuracy" not in out and f"autosquash ui --out {tmp_path}" in out


def test_print_front_reads_rows_back_from_pareto_csv(study, tmp_path, capsys):
    """Rows read from pareto.csv hold strings: an empty lm-eval cell prints as a dash, a number as one."""
    import csv

    _, front = write_tables(study, tmp_path)
    rows = list(csv.DictReader((tmp_path / "pareto.csv").open()))
    rows[0]["lm_eval_mean_acc"], rows[1]["lm_eval_mean_acc"] = "0.5", ""
    print_front(rows, _experiment(["piqa"]), tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].split()[-2] == "0.500" and lines[3].split()[-2] == "-"


def test_trial_run_names_say_what_the_plan_is():
    from autosquash.compress.plan import LayerChoice, Plan
    from autosquash.search.outputs import trial_run_name

    uniform = Plan(embed_quant="Q8_0", groups={"blk.0.attn": LayerChoice(quant="Q4_0")})
    metrics = {"weights_mb": 93.04, "kl": 0.04612}
    assert trial_run_name(12, uniform, metrics) == "t12 Q4_0 93.0 MB kl 0.0461"
    pruned = Plan(groups={"blk.0.attn": LayerChoice(quant="Q4_0", attn_keep_ratio=0.5)})
    assert trial_run_name(3, pruned, metrics) == "t3 mixed 93.0 MB kl 0.0461"
    assert trial_run_name(4, Plan(), None) == "t4 F16 failed"
