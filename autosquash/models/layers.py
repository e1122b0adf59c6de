"""Torch modules a deployed model is made of beyond transformers' own: weights installed without a
random initialisation, and sublayers pruned away."""

from __future__ import annotations

import torch


def linear_with(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free linear layer holding `weight` (out, in), built without a random initialisation to discard."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight)
    return layer


def with_bias(module: torch.nn.Module, bias: torch.Tensor | None) -> torch.nn.Module:
    """`module` (a linear in any form: nn.Linear, low-rank, Kronecker) adding `bias` to its output, held as its
    own `bias` parameter as nn.Linear holds one; unchanged when `bias` is None."""
    if bias is not None:
        module.bias = torch.nn.Parameter(bias)
    return module


class RemovedAttention(torch.nn.Module):
    """An attention sublayer pruned away: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(torch.nn.Module):
    """An FFN sublayer pruned away: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)
