"""The offline texts: the shipped sources, a user's file, and the token blocks cut from them."""

from __future__ import annotations

import pytest
import torch

from autosquash.errors import AutosquashError
from autosquash.evaluate.texts import SOURCES, load_texts, token_block
from autosquash.models.load import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("source", SOURCES)
def test_shipped_sources_load_non_empty(source):
    texts = load_texts(source)
    assert len(texts) > 100 and all(isinstance(t, str) and t.strip() for t in texts)


def test_wikipedia_keeps_each_boolq_passage_once():
    texts = load_texts("wikipedia")
    assert len(set(texts)) == len(texts)  # BoolQ asks several questions of one passage


def test_calibration_and_evaluation_sources_share_no_text():
    assert not set(load_texts("wikipedia")) & set(load_texts("lambada"))


def test_a_user_file_is_one_text_as_written(tmp_path):
    """One token stream, as llama.cpp reads a file: no EOS between its paragraphs for the model to predict."""
    body = "  First paragraph,\nstill the first.\n\n\n\nSecond one.\n\n   \n\nThird.\n"
    f = tmp_path / "mine.txt"
    f.write_text(body, encoding="utf-8")
    assert load_texts(str(f)) == (body,)


def test_a_binary_file_is_refused_as_not_text(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(AutosquashError, match="is not UTF-8 text"):
        load_texts(str(f))


def test_a_blank_user_file_is_refused(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n\n   \n\n", encoding="utf-8")
    with pytest.raises(AutosquashError, match="is empty"):
        load_texts(str(f))


def test_an_unknown_source_is_refused_by_name(tmp_path):
    with pytest.raises(AutosquashError, match="'no-such-source'.*wikipedia nor lambada"):
        load_texts("no-such-source")


def test_token_block_has_the_asked_shape_and_is_deterministic(tokenizer):
    texts = load_texts("wikipedia")
    block = token_block(tokenizer, texts, 1000, 128)
    assert block.shape == (1000 // 128, 128) and block.dtype == torch.long
    assert torch.equal(block, token_block(tokenizer, texts, 1000, 128))
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert block.flatten()[: len(first) + 1].tolist() == [*first, tokenizer.eos_token_id]  # texts joined by EOS


def test_a_budget_below_one_sequence_is_refused(tokenizer):
    with pytest.raises(AutosquashError, match="budget of 100 is smaller than one sequence of 128"):
        token_block(tokenizer, load_texts("wikipedia"), 100, 128)


def test_text_shorter_than_one_sequence_is_refused(tokenizer):
    with pytest.raises(AutosquashError, match=r"holds only \d+ tokens, fewer than one sequence of 128"):
        token_block(tokenizer, ("a few words",), 1024, 128)


def test_text_shorter_than_the_budget_gives_fewer_rows(tokenizer):
    """What it does today: as many whole sequences as the text holds, with no error or warning."""
    texts = ("word " * 300,)
    n_ids = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) + 1  # and its EOS
    assert n_ids < 1024
    assert token_block(tokenizer, texts, 1024, 128).shape == (n_ids // 128, 128)


class _NoSpecialTokens:
    """A tokenizer without EOS or BOS (some base models ship one): word ids, nothing to join texts with."""

    eos_token_id = None
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_texts_join_with_bos_where_there_is_no_eos_and_a_tokenizer_with_neither_is_refused():
    tok = _NoSpecialTokens()
    with pytest.raises(AutosquashError, match="neither an EOS nor a BOS token"):
        token_block(tok, ("a b c d",) * 4, 8, 4)
    tok.bos_token_id = 99
    assert token_block(tok, ("a bb ccc",) * 4, 8, 4).flatten().tolist() == [1, 2, 3, 99, 1, 2, 3, 99]
