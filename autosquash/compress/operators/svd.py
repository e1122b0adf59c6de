"""Truncated SVD: a linear stored as two factors W ≈ B·A, activation-aware (ASVD), each factor quantized."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import ChoiceField, Form, LinearDeploy, TensorSpec, matrix_spec
from autosquash.compress.quantize import quantize
from autosquash.models.layers import linear_with

# Factors are stored in whole quantization blocks, so ranks are rounded to this multiple.
RANK_MULTIPLE = 32


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


def factor_rank(out_features: int, in_features: int, rank_ratio: float) -> int:
    """Rank of a low-rank factorisation, or 0 when none is asked for or it would not save storage."""
    if rank_ratio <= 0:
        return 0
    r = max(RANK_MULTIPLE, round(rank_ratio * min(out_features, in_features) / RANK_MULTIPLE) * RANK_MULTIPLE)
    return r if r * (out_features + in_features) < out_features * in_features else 0


class SVD(Form):
    """`lr_a` (rank, in) and `lr_b` (out, rank), rank `rank_ratio` of the smaller side, a multiple of 32."""

    name = "svd"
    what = "decompositions (SVD factors)"
    gguf = False
    fields = (ChoiceField("rank_ratio", float, 0.0, {"ge": 0.0, "lt": 1.0}),)
    suffixes = ("lr_a", "lr_b")

    def size(self, out_features: int, in_features: int, choice) -> int:
        return factor_rank(out_features, in_features, choice.rank_ratio)

    def tensors(self, name: str, out_f: int, in_f: int, quant: str, size: int) -> list[TensorSpec]:
        return [
            matrix_spec(f"{name}.lr_a", size, in_f, quant, size * in_f),
            matrix_spec(f"{name}.lr_b", out_f, size, quant, out_f * size),
        ]

    def compress(self, weight: torch.Tensor, deploy: LinearDeploy, input_sq: torch.Tensor | None) -> dict:
        a, b = svd_factors(weight, deploy.size, input_sq)
        return {"lr_a": quantize(a, deploy.type_of("lr_a"), input_sq), "lr_b": quantize(b, deploy.type_of("lr_b"))}

    def module(self, parts: dict[str, torch.Tensor]) -> torch.nn.Module:
        return LowRankLinear(parts["lr_a"], parts["lr_b"])

    def dense(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["lr_b"] @ parts["lr_a"]


OPERATOR = SVD()
