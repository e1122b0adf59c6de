"""The encoder of ggml's lattice types (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS): signs, importance, projection onto
the grid, and an error at most ggml's own quantizer's at the same importance."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import fake_quantize, lattice, quantize
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QuantizedTensor, dequantize
from autosquash.formats.gguf_types import legal_type, tensor_type
from tests.formats.test_codecs import _one_thread  # noqa: F401  (autouse: one torch thread here too, as there)
from tests.formats.test_iq_lattice import LATTICE, _importance, _seeded_t


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

    # Measured ratios 0.21-0.39 with this importance (the same spread as test_quantize.py's).
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
        tab = lattice._tables(name, torch.device("cpu"))
        dim, n = tab.grid.shape[1], 4096
        t = _seeded_t(dim, n, 7).abs() * (tab.top / 4)  # values in grid units, as a sub-block's step maps them
        w = torch.rand(dim, n, generator=torch.Generator().manual_seed(8)) + 0.05
        index, point = lattice._project(t, w, tab)
        assert torch.equal(point, tab.grid_t[:, index])
        err = (w * (t - point).square()).sum(0)
        every = (w.T.unsqueeze(1) * (t.T.unsqueeze(1) - tab.grid.unsqueeze(0)).square()).sum(-1)  # (n, J)
        best = every.amin(-1)
        # Measured: the exhaustive search's point for 96.5-98.6 % of the groups, 0.5-1.0 % above its error in all.
        assert float((err <= best * (1 + 1e-5)).float().mean()) > 0.95, name
        assert float(err.sum()) < 1.015 * float(best.sum()), name
        # Targets on grid points come back as those points, whatever the weights.
        on, _ = lattice._project(tab.grid_t[:, index], w, tab)
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
