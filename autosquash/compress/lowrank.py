"""Truncated SVD of a linear layer into two smaller linears, plain or activation-aware."""

from __future__ import annotations

import torch

from autosquash.models.layers import linear_with


def svd_factors(
    weight: torch.Tensor, rank: int, input_sq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A: rank x in, B: out x rank) with W ≈ B @ A.

    With `input_sq` (E[x²] per input channel) the SVD minimises the output error on calibration
    activations rather than the weight error (ASVD, Yuan et al., 2023: scale columns, factor, unscale).
    """
    w = weight.float()
    scale = input_sq.to(w.device, torch.float32).sqrt().clamp_min(1e-6) if input_sq is not None else None
    u, s, vh = torch.linalg.svd(w * scale if scale is not None else w, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if scale is not None:
        a = a / scale
    return a.contiguous(), b.contiguous()


class LowRankLinear(torch.nn.Module):
    """y = B(A(x)): a linear layer stored as two factors, held as `lr_a` and `lr_b` (their tensors' names)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.lr_a, self.lr_b = linear_with(a), linear_with(b)
        self.register_parameter("bias", None)  # the original linear's, where it has one (layers.with_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lr_b(self.lr_a(x))
        return y if self.bias is None else y + self.bias
