"""Truncated SVD: a linear stored as two factors W ≈ B·A, activation-aware (ASVD), each factor quantized."""

from __future__ import annotations

import torch

from autosquash.compress.lowrank import LowRankLinear, svd_factors
from autosquash.compress.operators.base import ChoiceField, Form, LinearDeploy, TensorSpec, matrix_spec
from autosquash.formats.codecs import quantize

# Factors are stored in whole quantization blocks, so ranks are rounded to this multiple.
RANK_MULTIPLE = 32


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
