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


def _word_tokenizer(bos_first: bool):
    """A word-level tokenizer over a small vocabulary; with `bos_first`, it starts every encoding with <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", *"the cat sat on a mat and ran far away".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_first:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_rows_start_with_bos_where_the_tokenizer_starts_encodings_with_it():
    """As llama.cpp's perplexity scores a BOS model (Gemma's perplexity is ~20x higher without its BOS)."""
    from autosquash.evaluate.texts import adds_bos

    texts = ("the cat sat on a mat and ran far away " * 8,)
    plain, with_bos = _word_tokenizer(False), _word_tokenizer(True)
    assert not adds_bos(plain) and adds_bos(with_bos)
    a, b = token_block(plain, texts, 40, 8), token_block(with_bos, texts, 40, 8)
    assert (b[:, 0] == 0).all() and not (a[:, 0] == 0).any()
    assert torch.equal(a[:, 1:], b[:, 1:])  # the same text, only each row's first token replaced
