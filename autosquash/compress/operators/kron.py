"""Permuted Kronecker decomposition: a linear stored as `kron_rank` terms A_k ⊗ B_k with learned row and column
permutations, activation-aware; A and B quantized one row per term, the permutations as int16 indices, the column
scale in F32.

W ≈ P · (Σ_k A_k ⊗ B_k) · Q: the factors come from the Van Loan–Pitsianis rearrangement (Van Loan & Pitsianis,
"Approximation with Kronecker products", 1993), the permutations P, Q from an alternating search as in TQCompressor
(Abronin et al., IEEE MIPR 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from autosquash.compress.operators.base import ChoiceField, Form, LinearDeploy, TensorSpec, matrix_spec
from autosquash.compress.quantize import quantize

KronShape = tuple[int, int, int, int]  # (m1, m2, n1, n2): A is m1 x n1, B is m2 x n2

# A search step is kept only when it lowers the squared error by more than this fraction: float32 SVD noise
# must not count as progress.
_MIN_GAIN = 1e-6


def kron_shape(out_features: int, in_features: int) -> KronShape:
    """(m1, m2, n1, n2) with m1·m2 = out, n1·n2 = in, each pair near its square root.

    m1 <= m2 and n1 >= n2, so A (m1 x n1) and B (m2 x n2) hold similar numbers of values and the rearranged
    matrix (m1·n1 x m2·n2) is as square as the divisors allow (Van Loan & Pitsianis, 1993).
    """
    m1 = max(d for d in range(1, math.isqrt(out_features) + 1) if out_features % d == 0)
    n2 = max(d for d in range(1, math.isqrt(in_features) + 1) if in_features % d == 0)
    return m1, out_features // m1, in_features // n2, n2


def kron_macs(shape: KronShape, rank: int) -> int:
    """Multiply-adds of one y = W x through `rank` Kronecker terms, in the cheaper contraction order."""
    m1, m2, n1, n2 = shape
    return rank * min(n1 * m2 * (n2 + m1), m1 * n2 * (n1 + m2))


@dataclass(frozen=True)
class KronFactors:
    """W ≈ (Σ_k A_k ⊗ B_k)[inverse row_perm][:, inverse col_perm] · diag(col_scale).

    A: (r, m1, n1), B: (r, m2, n2). `W[row_perm][:, col_perm]` is the matrix the Kronecker sum approximates.
    `col_scale` (n,) is present only for an activation-aware fit.
    """

    a: torch.Tensor
    b: torch.Tensor
    row_perm: torch.Tensor
    col_perm: torch.Tensor
    col_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of Kronecker terms r."""
        return self.a.shape[0]

    @property
    def shape(self) -> KronShape:
        """(m1, m2, n1, n2)."""
        _, m1, n1 = self.a.shape
        _, m2, n2 = self.b.shape
        return m1, m2, n1, n2

    @property
    def n_params(self) -> int:
        """Stored weight values: r·(m1·n1 + m2·n2), plus n for an activation-aware column scale."""
        scale = 0 if self.col_scale is None else self.col_scale.numel()
        return self.a.numel() + self.b.numel() + scale

    @property
    def index_bytes(self) -> int:
        """Storage of the two permutations as int16 indices (m + n of them)."""
        return 2 * (self.row_perm.numel() + self.col_perm.numel())

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds of one y = W x through the factors, in the cheaper contraction order (see KronLinear)."""
        return kron_macs(self.shape, self.rank)

    def matrix(self) -> torch.Tensor:
        """The dense approximation of W, in W's own row and column order."""
        k = _kron_sum(self.a, self.b)
        w = k[torch.argsort(self.row_perm)][:, torch.argsort(self.col_perm)]
        return w if self.col_scale is None else w * self.col_scale


def _rearrange(w: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """R(W): row (i1, j1) holds the block W[i1·m2:(i1+1)·m2, j1·n2:(j1+1)·n2], flattened."""
    m1, m2, n1, n2 = shape
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def _kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("kac,kbd->abcd", a, b).reshape(m1 * m2, n1 * n2)


def _fit(w: torch.Tensor, rank: int, shape: KronShape) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best Σ_k A_k ⊗ B_k of `rank` terms for `w` (rank-r SVD of R(W)), and its squared error."""
    m1, m2, n1, n2 = shape
    u, s, vh = torch.linalg.svd(_rearrange(w, shape), full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).T.reshape(rank, m1, n1)
    b = (root[:, None] * vh[:rank]).reshape(rank, m2, n2)
    # ||R(W)||² equals ||W||², and the rank-r SVD leaves exactly the tail of the spectrum.
    return a.contiguous(), b.contiguous(), float(s[rank:].square().sum())


def _refit(
    w: torch.Tensor, b: torch.Tensor, shape: KronShape, sweeps: int = 2
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors for `w` by subspace iteration on R(W) from the right factors `b`, and their squared error.

    Much cheaper than the SVD, and never worse than the old factors on `w`: the first projection already gives the
    best fit whose right factors span `b`'s space.
    """
    m1, m2, n1, n2 = shape
    rank = b.shape[0]
    rw = _rearrange(w, shape)
    v = torch.linalg.qr(b.reshape(rank, -1).T).Q
    for _ in range(sweeps):
        u = torch.linalg.qr(rw @ v).Q
        v = torch.linalg.qr(rw.T @ u).Q
    core_u, core_s, core_vh = torch.linalg.svd(u.T @ rw @ v)
    root = core_s.sqrt()
    a_mat, b_mat = (u @ core_u) * root, root[:, None] * (core_vh @ v.T)
    err = float((rw - a_mat @ b_mat).square().sum())
    return a_mat.T.reshape(rank, m1, n1).contiguous(), b_mat.reshape(rank, m2, n2).contiguous(), err


def _assign_rows(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The permutation p minimising ||w[p] - target||² (a linear assignment on squared row distances)."""
    cost = w.square().sum(1)[:, None] + target.square().sum(1)[None, :] - 2 * w @ target.T
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    p = torch.empty(w.shape[0], dtype=torch.long, device="cpu")  # scipy answered on the CPU
    p[torch.from_numpy(cols)] = torch.from_numpy(rows)
    return p.to(w.device)


def _search(w: torch.Tensor, ranks: tuple[int, ...], shape: KronShape, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column permutations found from the identity by alternating assignments and refits at each of `ranks`.

    A step is kept only when it lowers the error, so each rank's search ends no worse than it started.
    """
    row_perm, col_perm = torch.arange(w.shape[0], device=w.device), torch.arange(w.shape[1], device=w.device)
    for rank in ranks:
        a, b, err = _fit(w[row_perm][:, col_perm], rank, shape)
        for _ in range(iters):
            improved = False
            for axis in (0, 1):
                wp, k = w[row_perm][:, col_perm], _kron_sum(a, b)
                if axis == 0:
                    new_rows, new_cols = row_perm[_assign_rows(wp, k)], col_perm
                else:
                    new_rows, new_cols = row_perm, col_perm[_assign_rows(wp.T, k.T)]
                new_a, new_b, new_err = _refit(w[new_rows][:, new_cols], b, shape)
                if new_err < err * (1 - _MIN_GAIN):
                    row_perm, col_perm, a, b, err = new_rows, new_cols, new_a, new_b, new_err
                    improved = True
            if not improved:
                break
    return row_perm, col_perm


def kron_factors(
    weight: torch.Tensor,
    rank: int,
    shape: KronShape | None = None,
    permute: bool = True,
    iters: int = 8,
    input_sq: torch.Tensor | None = None,
    search_rank: int = 1,
) -> KronFactors:
    """Σ_k A_k ⊗ B_k of `rank` terms approximating `weight` (out x in), after permuting its rows and columns.

    Factors: rank-r SVD of the Van Loan–Pitsianis rearrangement. Permutations (TQCompressor, Abronin et al., IEEE
    MIPR 2024): alternating linear assignments of W's rows, then columns, to the current approximation and refits,
    at most `iters` rounds, searched at `rank` and at `search_rank` then `rank`; the best is kept only if it beats
    the unpermuted fit. `input_sq` (E[x²] per input channel) weights column j by sqrt(E[x_j²]) as in ASVD (Yuan et
    al., 2023); that scaling is not Kronecker-structured, so the factors keep it as `col_scale` (n more values).
    """
    m, n = weight.shape
    shape = shape or kron_shape(m, n)
    m1, m2, n1, n2 = shape
    if m1 * m2 != m or n1 * n2 != n:
        raise ValueError(f"Kronecker shape {shape} does not factor a {m}x{n} weight: need m1·m2 = {m}, n1·n2 = {n}")
    if not 1 <= rank <= min(m1 * n1, m2 * n2):
        raise ValueError(f"rank {rank} is outside 1..{min(m1 * n1, m2 * n2)} for Kronecker shape {shape}")
    w = weight.float()
    scale = input_sq.to(w.device, torch.float32).sqrt().clamp_min(1e-6) if input_sq is not None else None
    if scale is not None:
        w = w * scale
    row_perm, col_perm = torch.arange(m, device=w.device), torch.arange(n, device=w.device)
    a, b, err = _fit(w, rank, shape)
    # On real weights a search at a high rank stalls at once (the fit already matches each row of W best), while a
    # rank-1 fit leaves the assignment room to regroup rows and columns (measured on SmolLM2); a permuted exact sum
    # of r products is recovered more often by searching at rank r.
    schedules = [(rank,), (search_rank, rank)] if search_rank < rank else [(rank,)]
    for ranks in schedules if permute else []:
        rows, cols = _search(w, ranks, shape, iters)
        perm_a, perm_b, perm_err = _fit(w[rows][:, cols], rank, shape)
        if perm_err < err * (1 - _MIN_GAIN):
            row_perm, col_perm, a, b, err = rows, cols, perm_a, perm_b, perm_err
    return KronFactors(a, b, row_perm, col_perm, None if scale is None else 1 / scale)


class KronLinear(torch.nn.Module):
    """y = x @ W^T for W stored as Kronecker factors, computed as Σ_k A_k Z B_k^T without forming W."""

    def __init__(self, factors: KronFactors):
        super().__init__()
        m1, m2, n1, n2 = factors.shape
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.a = torch.nn.Parameter(factors.a.clone())
        self.b = torch.nn.Parameter(factors.b.clone())
        scale = factors.col_scale
        self.register_parameter("col_scale", None if scale is None else torch.nn.Parameter(scale.clone()))
        self.register_buffer("col_perm", factors.col_perm.clone())
        self.register_buffer("row_unperm", torch.argsort(factors.row_perm))
        # Contracting B first keeps an (r, n1, m2) intermediate per token, A first an (r, m1, n2) one: take the
        # order with fewer multiply-adds.
        self.b_first = n1 * m2 * (n2 + m1) <= m1 * n2 * (n1 + m2)
        self.register_parameter("bias", None)  # the original linear's, where it has one (layers.with_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, m1, n1 = self.a.shape
        _, m2, n2 = self.b.shape
        lead = x.shape[:-1]
        if self.col_scale is not None:
            x = x * self.col_scale
        # Row-major vec: (A ⊗ B) vec(Z) = vec(A Z B^T), with Z the permuted input as an (n1, n2) matrix.
        z = x[..., self.col_perm].reshape(*lead, n1, n2)
        if self.b_first:
            y = torch.einsum("...kcb,kac->...ab", torch.einsum("...cd,kbd->...kcb", z, self.b), self.a)
        else:
            y = torch.einsum("...kad,kbd->...ab", torch.einsum("...cd,kac->...kad", z, self.a), self.b)
        y = y.reshape(*lead, m1 * m2)[..., self.row_unperm]
        return y if self.bias is None else y + self.bias


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
