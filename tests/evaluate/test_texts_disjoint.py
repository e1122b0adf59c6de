"""Calibration and held-out token sets are kept apart by their contents, whatever their sources are named."""

from pathlib import Path

import pytest
import torch

from autosquash.errors import AutosquashError
from autosquash.evaluate.texts import WINDOW, check_disjoint, load_texts, overlap, token_block
from autosquash.models.load import load_tokenizer
from autosquash.search.experiment import Experiment, TextSpec
from autosquash.search.trial import load_inputs

ROOT = Path(__file__).parents[2]
VOCAB = 49152


def batch(seed: int, rows: int = 4, seq_len: int = 128) -> torch.Tensor:
    # Random tokens of a real-sized vocabulary: two such batches share no 32-token run by chance.
    return torch.randint(VOCAB, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def test_different_batches_pass():
    a, b = batch(0), batch(1)
    assert overlap(a, b) == 0
    check_disjoint(a, b)


def test_a_copy_is_refused_with_the_count():
    a = batch(0)
    with pytest.raises(AutosquashError, match=r"16 of the evaluation set's 16 32-token windows \(4 of its 4 sequences"):
        check_disjoint(a, a.clone())


def test_one_shared_row_is_refused():
    a, b = batch(0), batch(1)
    b[2] = a[0]
    assert overlap(a, b) == 128 // WINDOW
    with pytest.raises(AutosquashError, match=r"4 of the evaluation set's 16 .*\(1 of its 4 sequences\)"):
        check_disjoint(a, b)


def test_a_run_shifted_across_rows_is_found():
    """A passage that starts at another offset, straddling a row boundary in the held-out set."""
    a, b = batch(0), batch(1, rows=2)
    run = a.reshape(-1)[77 : 77 + 2 * WINDOW - 1]  # the shortest run that is always found
    b.reshape(-1)[100 : 100 + len(run)] = run  # crosses from row 0 into row 1
    assert overlap(a, b) == 1
    with pytest.raises(AutosquashError, match=r"1 of the evaluation set's 8 .*\(0 of its 2 sequences\)"):
        check_disjoint(a, b)


def test_short_common_runs_are_not_shared_text():
    """Runs shorter than a window (a common phrase, a run of EOS) do not refuse a pair of texts."""
    a, b = batch(0), batch(1)
    b[1, 10 : 10 + WINDOW - 1] = a[3, 50 : 50 + WINDOW - 1]
    check_disjoint(a, b)


def test_a_text_file_copying_lambada_is_refused(tokenizer, tmp_path):
    """Differently named sources, same text at another offset: refused by content."""
    copy = tmp_path / "my-text.txt"
    copy.write_text("\n\n".join(load_texts("lambada")[3:40]), encoding="utf-8")
    calib = token_block(tokenizer, load_texts(str(copy)), 2048, 256)
    held_out = token_block(tokenizer, load_texts("lambada"), 2048, 256)
    assert overlap(calib, held_out) > 0
    with pytest.raises(AutosquashError, match="calibration and evaluation texts overlap"):
        check_disjoint(calib, held_out)


def test_the_default_texts_are_disjoint(tokenizer):
    """The default experiment's sets: 2048 Wikipedia (BoolQ) tokens, 2048 LAMBADA tokens."""
    calib = token_block(tokenizer, load_texts("wikipedia"), 2048, 256)
    held_out = token_block(tokenizer, load_texts("lambada"), 2048, 256)
    check_disjoint(calib, held_out)


def test_load_inputs_refuses_the_same_file_under_two_paths(tmp_path, capsys):
    """Refused before the model loads, so a misconfigured search costs no model load."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(load_texts("wikipedia")[:20]), encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(text)
    exp = Experiment(
        name="same-text",
        model=str(ROOT / "experiments/tiny-llama.json"),
        phone="iphone-16",
        search_space=str(ROOT / "search_spaces/torch-small.yaml"),
        calibration=TextSpec(source=str(text), tokens=256, seq_len=128),
        evaluation=TextSpec(source=str(tmp_path / "link.txt"), tokens=256, seq_len=128),
    )
    with pytest.raises(AutosquashError, match=r"overlap: 8 of .* 8 32-token windows \(2 of its 2 sequences\)"):
        load_inputs(exp, tmp_path)
    assert "loading" not in capsys.readouterr().out
