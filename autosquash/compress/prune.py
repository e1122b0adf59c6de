"""Structured pruning of FFN channels, which shrinks the dense model (and a GGUF file's tensors)."""

from __future__ import annotations

import torch


def ffn_channel_importance(down_weight: torch.Tensor, down_input_sq: torch.Tensor | None) -> torch.Tensor:
    """Score of each FFN channel: the norm of its down-projection column times its RMS activation.

    Activation-aware as in Wanda (Sun et al., 2023), applied to whole channels; without statistics
    it is the column norm alone.
    """
    score = down_weight.float().norm(dim=0)
    if down_input_sq is not None:
        score = score * down_input_sq.float().sqrt()
    return score


def keep_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important channels, in their original order."""
    return torch.topk(importance, keep).indices.sort().values
