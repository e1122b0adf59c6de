from itertools import pairwise

import pytest
import torch

from autosquash.compress.operators.kron import KronFactors, KronLinear, kron_factors, kron_shape

# float32 SVD of a matrix with entries of order 1 leaves a relative error of order 1e-7; 1e-5 gives a wide margin
# while staying far below the errors of any wrong permutation (above 0.1 in every case here).
EXACT = 1e-5


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(a[k], b[k]) for k in range(a.shape[0]))


def _random_factors(rank: int, shape: tuple[int, int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m1, m2, n1, n2 = shape
    return torch.randn(rank, m1, n1, generator=g), torch.randn(rank, m2, n2, generator=g)


def _scramble(n: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A permutation that shuffles a random `fraction` of the n positions among themselves."""
    p = torch.arange(n)
    moved = torch.randperm(n, generator=g)[: int(fraction * n)]
    p[moved] = moved[torch.randperm(len(moved), generator=g)]
    return p


def _rel_error(f: KronFactors, w: torch.Tensor) -> float:
    return float((f.matrix() - w).norm() / w.norm())


def test_kron_shape_factors_near_square_roots():
    assert kron_shape(576, 576) == (24, 24, 24, 24)
    assert kron_shape(1536, 576) == (32, 48, 24, 24)
    assert kron_shape(576, 1536) == (24, 24, 48, 32)
    assert kron_shape(7, 5) == (1, 7, 5, 1)  # primes: the only factorisation left is the outer product


@pytest.mark.parametrize("rank", [1, 2])
def test_exact_sum_of_kronecker_products_is_recovered(rank):
    shape = (4, 6, 5, 3)
    a, b = _random_factors(rank, shape, seed=rank)
    w = _kron(a, b)
    f = kron_factors(w, rank, shape, permute=False)
    assert _rel_error(f, w) < EXACT
    assert torch.equal(f.row_perm, torch.arange(24)) and torch.equal(f.col_perm, torch.arange(15))


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_kronecker_product_is_recovered(rank, seed):
    # The search is local (assignments against the current fit), so it undoes a partial scramble: here 30 % of the
    # rows and of the columns trade places. Measured: 20/20 seeds recovered at this size and rank 1-3; a full
    # random scramble of both sides is rarely recovered (1 of 34 tries from 4x4 (x) 4x4 to 16x24 (x) 24x16).
    shape = (8, 8, 8, 8)
    a, b = _random_factors(rank, shape, seed)
    g = torch.Generator().manual_seed(100 + seed)
    w = _kron(a, b)[_scramble(64, 0.3, g)][:, _scramble(64, 0.3, g)]
    assert _rel_error(kron_factors(w, rank, shape, permute=False), w) > 0.1
    f = kron_factors(w, rank, shape)
    assert _rel_error(f, w) < EXACT


def test_error_decreases_with_rank():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    shape = kron_shape(48, 40)
    assert shape == (6, 8, 8, 5)
    plain = [_rel_error(kron_factors(w, r, shape, permute=False), w) for r in (1, 2, 4, 8, 16, 40)]
    assert all(x > y for x, y in pairwise(plain))
    assert plain[-1] < EXACT  # rank 40 = min(m1·n1, m2·n2) keeps the whole rearranged matrix
    # Permutations are kept only when they lower the error, so they never do worse than the plain fit.
    for r, e in zip((1, 2, 4), plain, strict=False):
        assert _rel_error(kron_factors(w, r, shape), w) <= e + 1e-6


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (6, 4, 3, 5)])  # one of each contraction order
@pytest.mark.parametrize("scaled", [False, True])
def test_kron_linear_matches_dense_product(shape, scaled):
    m1, m2, n1, n2 = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, m1, n1, generator=g), torch.randn(3, m2, n2, generator=g)
    col_scale = torch.rand(n1 * n2, generator=g) + 0.1 if scaled else None
    f = KronFactors(a, b, torch.randperm(m1 * m2, generator=g), torch.randperm(n1 * n2, generator=g), col_scale)
    layer = KronLinear(f)
    x = torch.randn(2, 3, n1 * n2, generator=g)
    # Same products, different summation order: float32 rounding only.
    torch.testing.assert_close(layer(x), x @ f.matrix().T, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == f.n_params


def test_parameter_and_index_counts():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    f = kron_factors(w, 5)
    assert f.shape == (6, 8, 8, 5)
    assert f.n_params == 5 * (6 * 8 + 8 * 5)
    assert f.index_bytes == 2 * (48 + 40)
    assert f.macs_per_token == 5 * min(8 * 8 * (5 + 6), 6 * 5 * (8 + 8))
    aware = kron_factors(w, 5, input_sq=torch.ones(40))
    assert aware.n_params == f.n_params + 40  # the stored column scale


def test_activation_aware_fit_recovers_column_scaled_product():
    # W = (A ⊗ B) diag(1/s) is not a Kronecker product, but weighting columns by s = sqrt(E[x²]) makes it one.
    shape = (4, 6, 5, 3)
    a, b = _random_factors(1, shape, seed=3)
    s = torch.rand(15, generator=torch.Generator().manual_seed(4)) * 3 + 0.2
    w = _kron(a, b) / s
    assert _rel_error(kron_factors(w, 1, shape, permute=False), w) > 0.1
    assert _rel_error(kron_factors(w, 1, shape, permute=False, input_sq=s.square()), w) < EXACT


def test_bad_shape_or_rank_is_refused():
    w = torch.randn(24, 15)
    with pytest.raises(ValueError, match="does not factor"):
        kron_factors(w, 1, (4, 5, 5, 3))
    with pytest.raises(ValueError, match="outside 1..18"):
        kron_factors(w, 19, (4, 6, 5, 3))
