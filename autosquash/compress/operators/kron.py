"""Permuted Kronecker decomposition (TQCompressor, Abronin et al., IEEE MIPR 2024): a linear stored as
`kron_rank` terms A_k ⊗ B_k with learned row and column permutations, activation-aware; A and B quantized
one row per term, the permutations as int16 indices, the column scale in F32."""

from __future__ import annotations

import torch

from autosquash.compress.kronecker import KronFactors, KronLinear, kron_factors, kron_macs, kron_shape
from autosquash.compress.operators.base import ChoiceField, Form, LinearDeploy, TensorSpec, matrix_spec
from autosquash.formats.codecs import quantize


def kron_terms(out_features: int, in_features: int, kron_rank: int) -> int:
    """Kronecker terms actually used: 0 when none is asked for or the factors would not save storage."""
    if kron_rank <= 0:
        return 0
    m1, m2, n1, n2 = kron_shape(out_features, in_features)
    r = min(kron_rank, m1 * n1, m2 * n2)
    return r if r * (m1 * n1 + m2 * n2) < out_features * in_features else 0


def _index_dtype(n: int) -> torch.dtype:
    """Permutation indices in int16 (as the cost model prices them) when they fit."""
    return torch.int16 if n <= 2**15 else torch.int32


def _factors(parts: dict[str, torch.Tensor]) -> KronFactors:
    """The factors, reshaped from one stored row per term back to (terms, rows, cols)."""
    row_perm, col_perm = parts["row_perm"].long(), parts["col_perm"].long()
    m1, m2, n1, n2 = kron_shape(row_perm.numel(), col_perm.numel())
    a, b = parts["kron_a"].reshape(-1, m1, n1), parts["kron_b"].reshape(-1, m2, n2)
    return KronFactors(a, b, row_perm, col_perm, parts.get("col_scale"))


class Kronecker(Form):
    """`kron_a` (terms, m1·n1), `kron_b` (terms, m2·n2), `row_perm`, `col_perm` and `col_scale`."""

    name = "kron"
    what = "decompositions (Kronecker factors)"
    gguf = False
    fields = (ChoiceField("kron_rank", int, 0, {"ge": 0}),)
    suffixes = ("kron_a", "kron_b", "row_perm", "col_perm", "col_scale")

    def size(self, out_features: int, in_features: int, choice) -> int:
        return kron_terms(out_features, in_features, choice.kron_rank)

    def tensors(self, name: str, out_f: int, in_f: int, quant: str, size: int) -> list[TensorSpec]:
        m1, m2, n1, n2 = kron_shape(out_f, in_f)
        # Factors are stored flattened, one row per term, so their rows hold whole quantization blocks.
        return [
            matrix_spec(f"{name}.kron_a", size, m1 * n1, quant, kron_macs((m1, m2, n1, n2), size)),
            matrix_spec(f"{name}.kron_b", size, m2 * n2, quant, 0),
            TensorSpec(f"{name}.row_perm", (out_f,), "I16", 0),
            TensorSpec(f"{name}.col_perm", (in_f,), "I16", 0),
            TensorSpec(f"{name}.col_scale", (in_f,), "F32", in_f),
        ]

    def compress(self, weight: torch.Tensor, deploy: LinearDeploy, input_sq: torch.Tensor | None) -> dict:
        sq = input_sq.to(weight.device) if input_sq is not None else torch.ones(weight.shape[1], device=weight.device)
        f = kron_factors(weight, deploy.size, input_sq=sq)
        parts = {
            "kron_a": quantize(f.a.reshape(deploy.size, -1), deploy.type_of("kron_a")),
            "kron_b": quantize(f.b.reshape(deploy.size, -1), deploy.type_of("kron_b")),
            "row_perm": f.row_perm.to(_index_dtype(f.row_perm.numel())),
            "col_perm": f.col_perm.to(_index_dtype(f.col_perm.numel())),
        }
        if f.col_scale is not None:
            parts["col_scale"] = f.col_scale.float()
        return parts

    def module(self, parts: dict[str, torch.Tensor]) -> torch.nn.Module:
        return KronLinear(_factors(parts))

    def dense(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return _factors(parts).matrix()


OPERATOR = Kronecker()
