"""Quantization: a linear stored as one matrix in a GGUF type, importance-weighted with the calibration
statistics as llama.cpp's imatrix does (autosquash.compress.quantize). Every other form quantizes its factors
through the same types."""

from __future__ import annotations

import torch

from autosquash.compress.gptq import quantize_compensated
from autosquash.compress.operators.base import ChoiceField, Form, LinearDeploy, TensorSpec, matrix_spec
from autosquash.compress.quantize import quantize
from autosquash.formats.gguf_types import searchable_type, tensor_type
from autosquash.models.arch import ATTN_LINEARS, FFN_LINEARS
from autosquash.models.layers import linear_with


def _known_type(v: str) -> str:
    return tensor_type(v).name


def _known_tensors(v: dict[str, str]) -> dict[str, str]:
    known = {n for n, _ in ATTN_LINEARS + FFN_LINEARS}
    for name in v:
        if name not in known:
            raise ValueError(f"unknown tensor {name!r}; expected one of {', '.join(sorted(known))}")
    return {k: tensor_type(t).name for k, t in v.items()}


class Quantization(Form):
    """One matrix per linear, `weight`, in the legal type for the choice's `quant` (its `tensor_quant`
    exception for that tensor, if any)."""

    name = "quant"
    what = "quantized matrices"
    fields = (
        ChoiceField("quant", str, "F16", space_default=False, validate=_known_type, validate_option=searchable_type),
        # Per-tensor exceptions to `quant`, by GGUF short name, e.g. {"attn_v": "Q6_K"} as in Q4_K_M.
        ChoiceField("tensor_quant", dict[str, str], {}, searched=False, validate=_known_tensors),
    )
    suffixes = ("weight",)
    plain = True
    row_separable = True
    compensates = True

    def size(self, out_features: int, in_features: int, choice) -> int:
        return 0

    def tensors(self, name: str, out_f: int, in_f: int, quant: str, size: int) -> list[TensorSpec]:
        return [matrix_spec(f"{name}.weight", out_f, in_f, quant, out_f * in_f)]

    def compress(self, weight: torch.Tensor, deploy: LinearDeploy, input_sq: torch.Tensor | None) -> dict:
        return {"weight": quantize(weight, deploy.type_of("weight"), input_sq)}

    def compress_compensated(
        self,
        weight: torch.Tensor,
        deploy: LinearDeploy,
        input_sq: torch.Tensor | None,
        hessian: torch.Tensor,
        damp: float,
    ) -> dict:
        return {"weight": quantize_compensated(weight, deploy.type_of("weight"), hessian, input_sq, damp)}

    def module(self, parts: dict[str, torch.Tensor]) -> torch.nn.Module:
        return linear_with(parts["weight"])

    def dense(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["weight"]


OPERATOR = Quantization()
