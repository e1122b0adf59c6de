"""ggml's lattice types (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS) as bytes: gguf reads our bytes as we decode them.
(The encoder's search is tests/compress/quantize/test_lattice.py's.)"""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import quantize
from autosquash.formats.codecs import QuantizedTensor, dequantize
from autosquash.formats.gguf_types import tensor_type
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
