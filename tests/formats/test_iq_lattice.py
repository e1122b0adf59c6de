"""ggml's lattice types (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS): gguf reads our bytes as we decode them, the
encoder weighs importance, and its error is at most ggml's own quantizer's at the same importance."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import fake_quantize, quantize
from autosquash.errors import AutosquashError
from autosquash.formats import iq_lattice
from autosquash.formats.codecs import QuantizedTensor, dequantize
from autosquash.formats.gguf_types import legal_type, tensor_type
from tests.formats.test_codecs import _one_thread  # noqa: F401  (autouse: one torch thread here too, as there)

LATTICE = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS")


def _seeded_t(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t(5) values, heavy-tailed like trained weights."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(5, rows, cols, generator=g).square().sum(0)
    return z / (chi2 / 5).sqrt()


def _importance(cols: int, seed: int = 1) -> torch.Tensor:
    """Log-normal per input channel, like an imatrix's mean squared activations."""
    return torch.exp(torch.randn(cols, generator=torch.Generator().manual_seed(seed)))


def _adversarial() -> torch.Tensor:
    w = _seeded_t(16, 512, 2)
    w[1] = 0.0  # a zero row
    w[2, 256:] = 0.0  # a zero super-block beside a normal one
    w[3, 32:64] = 0.0  # a zero sub-block
    w[4] = -0.37  # a constant row: every sign negative
    w[5] = 1e-6 * w[5]  # tiny values
    w[6, 10] = 300.0  # a lone spike, 200 times the others' spread
    w[7] = 1e4 * w[7]  # huge values
    w[8, ::2] = -w[8, ::2].abs()  # odd counts of negatives in many runs of 8
    return w


def _gguf(q: QuantizedTensor) -> np.ndarray:
    return gguf.quants.dequantize(q.data, GGMLQuantizationType[q.type]).reshape(q.shape)


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("type_name", LATTICE)
def test_gguf_decodes_our_bytes_bit_for_bit(type_name: str, with_importance: bool) -> None:
    for w in (_seeded_t(8, 512, 0), _adversarial()):
        imp = _importance(512) if with_importance else None
        q = quantize(w, type_name, imp)
        assert q.data.shape == gguf.quants.quant_shape_to_byte_shape(q.shape, GGMLQuantizationType[type_name])
        assert q.data.nbytes == tensor_type(type_name).nbytes(q.shape)
        ours = dequantize(q).numpy()
        np.testing.assert_array_equal(ours.view(np.uint32), _gguf(q).view(np.uint32))
        assert np.isfinite(ours).all()
    assert not ours[1].any() and not ours[2, 256:].any()  # a zero super-block stores d = 0
    # The lattices have no zero level: a zero sub-block beside non-zero ones decodes to the smallest step.
    # The lone spike keeps most of its size (measured 259-300 over types and weightings, ggml's 275-311).
    assert 0.8 * 300 < ours[6, 10] < 1.05 * 300


@pytest.mark.parametrize("type_name", LATTICE)
def test_signs_are_x_signs_but_one_in_eight_at_most(type_name: str) -> None:
    """IQ2_S and IQ3_S store every sign; the others 7 per 8 values, the eighth giving an even count of minus
    signs, so a run of 8 with an odd count codes its least important value with the wrong sign."""
    w = _seeded_t(8, 512, 4)
    wrong = (torch.sign(fake_quantize(w, type_name, _importance(512))) != torch.sign(w)).view(-1, 8).sum(-1)
    assert int(wrong.max()) == (1 if type_name in ("IQ2_XS", "IQ2_XXS", "IQ3_XXS") else 0)


@pytest.mark.parametrize("type_name", LATTICE)
def test_importance_lowers_the_weighted_error(type_name: str) -> None:
    w = _seeded_t(32, 1024, 5)
    imp = torch.exp(2.0 * torch.randn(1024, generator=torch.Generator().manual_seed(6)))

    def weighted(out: torch.Tensor) -> float:
        return float(((out - w).square() * imp).sum())

    # Measured ratios 0.21-0.39 with this importance (the same spread as tests/compress/quantize/test_quantize.py's).
    assert weighted(fake_quantize(w, type_name, imp)) < 0.6 * weighted(fake_quantize(w, type_name))


def test_rows_must_hold_whole_super_blocks() -> None:
    for type_name in LATTICE:
        with pytest.raises(AutosquashError, match=rf"{type_name} needs rows that are a multiple of 256.*576"):
            quantize(torch.randn(4, 576), type_name)
        # llama.cpp's quantize stores every IQ type on 256-value super-blocks as IQ4_NL there; so do we.
        assert legal_type(type_name, 576) == legal_type(type_name, 576, llama_cpp=True) == "IQ4_NL"
        assert legal_type(type_name, 1536) == type_name


def test_projection_is_exact_on_the_grid_and_near_the_exhaustive_search_off_it() -> None:
    for name in LATTICE:
        tab = iq_lattice._tables(name, torch.device("cpu"))
        dim, n = tab.grid.shape[1], 4096
        t = _seeded_t(dim, n, 7).abs() * (tab.top / 4)  # values in grid units, as a sub-block's step maps them
        w = torch.rand(dim, n, generator=torch.Generator().manual_seed(8)) + 0.05
        index, point = iq_lattice._project(t, w, tab)
        assert torch.equal(point, tab.grid_t[:, index])
        err = (w * (t - point).square()).sum(0)
        every = (w.T.unsqueeze(1) * (t.T.unsqueeze(1) - tab.grid.unsqueeze(0)).square()).sum(-1)  # (n, J)
        best = every.amin(-1)
        # Measured: the exhaustive search's point for 96.5-98.6 % of the groups, 0.5-1.0 % above its error in all.
        assert float((err <= best * (1 + 1e-5)).float().mean()) > 0.95, name
        assert float(err.sum()) < 1.015 * float(best.sum()), name
        # Targets on grid points come back as those points, whatever the weights.
        on, _ = iq_lattice._project(tab.grid_t[:, index], w, tab)
        assert torch.equal(on, index)


def _ggml_quantize(w: torch.Tensor, type_name: str, importance: torch.Tensor) -> QuantizedTensor:
    """ggml's own quantizer (ggml_quantize_chunk, as llama-quantize calls it) from llama-cpp-python's libggml."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    gt = int(GGMLQuantizationType[type_name])
    lib.ggml_quantize_init(gt)
    rows, cols = w.shape
    x, imp = np.ascontiguousarray(w.numpy()), np.ascontiguousarray(importance.numpy())
    out = np.empty((rows, tensor_type(type_name).nbytes((1, cols))), np.uint8)
    f(gt, x.ctypes.data, out.ctypes.data, 0, rows, cols, imp.ctypes.data)
    return QuantizedTensor(type_name, (rows, cols), out)


@pytest.mark.parametrize("type_name", LATTICE)
def test_weighted_error_at_most_ggmls(type_name: str) -> None:
    w, imp = _seeded_t(64, 1024, 8), _importance(1024, 9)

    def weighted(q: QuantizedTensor) -> float:
        return float(((dequantize(q) - w).square() * imp).sum())

    ratio = weighted(quantize(w, type_name, imp)) / weighted(_ggml_quantize(w, type_name, imp))
    # Measured 0.88-0.96 here (benchmarks/results/iq_lattice.txt on a million values and on Qwen2.5's ffn_down).
    assert ratio < 0.99, ratio
