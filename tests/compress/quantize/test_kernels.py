"""The compiled CPU scale searches (compress/quantize/kernels.py) against the torch ops a GPU runs, on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import (
    fake_quantize,
    importance_floor,
    kernels,
    no_worse_rows,
    quantize,
    quantize_no_worse,
)
from autosquash.formats import codecs
from autosquash.formats.bits import f16_rounded
from tests.formats.test_cpu_kernels import _case, torch_path  # noqa: F401  (torch_path: a fixture)

T = TypeVar("T")
# Every type whose weighted search goes through scales._fit_affine or scales._fit_scale.
SEARCHED = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _weighted_error(q: codecs.QuantizedTensor, w: torch.Tensor, imp: torch.Tensor) -> float:
    values = torch.from_numpy(gguf.quants.dequantize(q.data, GGMLQuantizationType[q.type]).copy())
    return float(((values - w).square() * imp).sum())


def compiled_and_torch(fn: Callable[..., T], *args) -> tuple[T, T]:
    """fn(*args) with the compiled CPU kernels, then with torch's ops (formats.codecs.COMPILED_CPU off)."""
    compiled = fn(*args)
    codecs.COMPILED_CPU = False
    try:
        plain = fn(*args)
    finally:
        codecs.COMPILED_CPU = True
    return compiled, plain


@pytest.mark.parametrize("type_name", SEARCHED)
def test_compiled_search_errs_as_the_torch_search(type_name: str) -> None:
    """Same candidates and formulas, sums in another order (the affine fit's in float64): the weighted error agrees to
    0.3 % (measured over seeds 0-7: compiled/torch 0.997-1.0014, Q5_K the widest; the few near-tied
    candidates float32 rounding decides flip), and the K-quants agree on most rows' bytes."""
    w, imp = _case()
    compiled, plain = compiled_and_torch(quantize, w, type_name, imp)
    assert _weighted_error(compiled, w, imp) == pytest.approx(_weighted_error(plain, w, imp), rel=3e-3)
    same_rows = float(np.all(compiled.data == plain.data, axis=-1).mean())
    assert same_rows > (0.1 if type_name == "Q8_0" else 0.5)  # Q8_0's 255 levels tie most often


@pytest.mark.parametrize("type_name", SEARCHED)
def test_compiled_search_errs_as_the_torch_search_beside_massive_activations(type_name: str) -> None:
    """With one channel weighted 1e6 the error is that channel's few values, and which near-tied candidate
    wins there is decided by rounding (float32 sums in torch, float64 in the compiled search) and then by
    the scales' rounding to f16 / 6 bits after the fit: either path wins some seeds. Measured over seeds
    0-7: compiled/torch 0.87-1.25 per seed, geometric mean 0.99-1.05 per type (Q5_K the highest). Bounds:
    1.4 per seed, and a geometric mean within 10 % over those eight seeds."""
    ratios = []
    for seed in range(8):
        w, imp = _case(seed, extreme=True)
        compiled, plain = compiled_and_torch(quantize, w, type_name, imp)
        ratios.append(_weighted_error(compiled, w, imp) / _weighted_error(plain, w, imp))
    assert max(ratios) < 1.4
    assert float(np.exp(np.mean(np.log(ratios)))) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("type_name", ("Q3_K", "Q6_K"))
def test_compiled_no_worse_rows_err_as_the_torch_ones(type_name: str) -> None:
    """Q3_K's and Q6_K's no-worse rows in one compiled pass (kernels.better_symmetric_k) against torch's: the
    values are what the bytes decode to, exactly; the weighted error within 0.3 %, the searches' bound (measured
    0.9994-1.0004 over seeds 0-7, with and without the outlier column); most rows' bytes the same (76-97 %)."""
    for seed in range(2):
        w, imp = _case(seed, extreme=seed == 1)
        imp = importance_floor(imp, w.shape[1], w.device)
        (data, values), (plain, plain_values) = compiled_and_torch(no_worse_rows, w, type_name, imp)
        assert torch.equal(values, codecs.decode_rows(data, type_name, w.shape[1]))
        err, plain_err = (float(((v - w).square() * imp).sum()) for v in (values, plain_values))
        assert err == pytest.approx(plain_err, rel=3e-3)
        assert float((data == plain).all(-1).float().mean()) > 0.5


def test_compiled_f16_rounding_is_torchs() -> None:
    """kernels._f16 (Q3_K's and Q6_K's d, rounded in the compiled pass) against torch's float16 cast, from
    f16's subnormals to its largest values, ties included."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20000, generator=g) * torch.logspace(-9, 4.8, 20000)
    ties = (torch.arange(1, 2000, dtype=torch.float32) + 0.5) * 2.0**-24  # halfway between f16 subnormals
    for x in (v, ties, -ties):
        rounded = np.array([kernels._f16(np.float32(a)) for a in x.numpy()], np.float32)
        assert np.array_equal(rounded, f16_rounded(x).numpy())


@pytest.mark.usefixtures("torch_path")
@pytest.mark.parametrize("type_name", ("Q8_0", "Q5_1", "Q4_0", "Q4_1"))
def test_both_searches_keep_legacy_grid_weights_exact_beside_massive_activations(type_name: str) -> None:
    """The torch path (a GPU's) and the compiled one: a weight already on the grid comes back exactly from the
    no-worse quantizer beside an input channel weighted 1e6 (the weighted search alone need not find it there,
    on either path)."""
    w, imp = _case(2, extreme=True)
    on_grid = fake_quantize(w, type_name)
    for compiled in (False, True):
        codecs.COMPILED_CPU = compiled
        assert torch.equal(codecs.dequantize(quantize_no_worse(on_grid, type_name, imp)), on_grid)


def test_all_zero_and_constant_rows() -> None:
    """Degenerate sub-blocks (all zero: no scale; constant: every code equal) decode to themselves or close."""
    w = torch.zeros(4, 256)
    w[1] = 0.5
    w[2, :32] = -1.0
    for type_name in ("Q4_K", "Q5_K", "Q2_K", "Q6_K", "Q3_K"):
        values = fake_quantize(w, type_name, torch.ones(256))
        assert torch.equal(values[0], w[0])
        assert torch.allclose(values, w, atol=0.02)
