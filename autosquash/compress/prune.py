"""Structured pruning of FFN channels and attention KV groups: it shrinks the dense model and its GGUF file."""

from __future__ import annotations

import torch


def input_channel_importance(down_weight: torch.Tensor, down_input_sq: torch.Tensor | None) -> torch.Tensor:
    """Score of each input channel of a linear (an FFN channel entering down_proj, say): the norm
    of its weight column times its RMS activation.

    Activation-aware as in Wanda (Sun et al., 2023), applied to whole channels; without statistics
    it is the column norm alone.
    """
    score = down_weight.float().norm(dim=0)
    if down_input_sq is not None:
        score = score * down_input_sq.to(score.device, torch.float32).sqrt()
    return score


def kv_group_importance(o_weight: torch.Tensor, o_input_sq: torch.Tensor | None, n_kv_heads: int) -> torch.Tensor:
    """Score of each KV group (a KV head and the query heads that share it): the summed importance
    of its channels entering the output projection, scored like FFN channels."""
    return input_channel_importance(o_weight, o_input_sq).view(n_kv_heads, -1).sum(-1)


def keep_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important channels, in their original order, in host memory (where the
    variant cache keeps selections; they index a weight on any device)."""
    return torch.topk(importance, keep).indices.sort().values.cpu()
