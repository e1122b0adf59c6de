"""The pruning operators' shared pieces: channel importance and the choice of channels to keep."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import input_channel_importance, keep_channels


def test_keep_channels_gives_the_top_k_in_ascending_order():
    importance = torch.tensor([0.5, 3.0, 0.1, 2.0, 4.0, 1.0])
    assert keep_channels(importance, 3).tolist() == [1, 3, 4]
    assert keep_channels(importance, 6).tolist() == list(range(6))


def test_without_statistics_importance_is_the_column_norm():
    w = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
    assert input_channel_importance(w, None).tolist() == [5.0, 2.0, 1.0]  # exact: small integers in float32


def test_a_larger_activation_outranks_an_equal_norm_column():
    w = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]])  # three columns of norm 1
    input_sq = torch.tensor([1.0, 9.0, 4.0])  # mean squares: RMS 1, 3, 2
    score = input_channel_importance(w, input_sq)
    torch.testing.assert_close(score, torch.tensor([1.0, 3.0, 2.0]))  # default float32 tolerance: one rounding
    assert keep_channels(score, 1).tolist() == [1]
