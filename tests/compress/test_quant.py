"""Quantization to GGUF types: exact bytes, gguf-package agreement, error ordering, importance weighting."""

from __future__ import annotations

from collections.abc import Iterator

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor, dequantize, fake_quantize, quantize
from autosquash.formats.gguf_types import tensor_type

# Types gguf.quants.quantize writes too; without importance ours must reproduce its bytes exactly.
GGUF_WRITES = ("F32", "F16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "TQ2_0", "TQ1_0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Pin torch to one thread here: the quantizer issues hundreds of mid-sized ops per chunk, and on a shared
    CI machine OpenMP barriers between two contended threads made this module 20x slower (1 s vs 22 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(rows: int = 64, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _skewed_importance(cols: int, seed: int = 1) -> torch.Tensor:
    """Per-channel importance spread over orders of magnitude, like mean squared activations with outliers."""
    return torch.exp(2.0 * torch.randn(cols, generator=torch.Generator().manual_seed(seed)))


def _gguf_dequantize(q: QuantizedTensor) -> np.ndarray:
    return gguf.quants.dequantize(q.data, GGMLQuantizationType[q.type])


def _rel_error(t: str, w: torch.Tensor) -> float:
    return float((fake_quantize(w, t) - w).norm() / w.norm())


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("type_name", QUANTIZABLE_TYPES)
def test_bytes_have_gguf_layout_and_decode_like_gguf(type_name: str, with_importance: bool) -> None:
    w = _weight()
    imp = _skewed_importance(w.shape[1]) if with_importance else None
    q = quantize(w, type_name, imp)
    ggml = GGMLQuantizationType[type_name]
    assert q.type == type_name and q.shape == (64, 512)
    assert q.data.dtype == np.uint8
    assert q.data.nbytes == tensor_type(type_name).nbytes(q.shape)
    assert q.data.shape == gguf.quants.quant_shape_to_byte_shape(q.shape, ggml)
    # Bitwise: our decoder performs the same float32 operations in the same order as gguf's.
    ours = dequantize(q).numpy()
    assert ours.dtype == np.float32 and ours.shape == q.shape
    np.testing.assert_array_equal(ours.view(np.uint32), _gguf_dequantize(q).view(np.uint32))
    assert torch.equal(fake_quantize(w, type_name, imp), dequantize(q))


@pytest.mark.parametrize("type_name", GGUF_WRITES)
def test_plain_quantization_reproduces_gguf_writer(type_name: str) -> None:
    w = _weight()
    expected = gguf.quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(quantize(w, type_name).data, expected.view(np.uint8))


@pytest.mark.parametrize("type_name", QUANTIZABLE_TYPES)
@pytest.mark.parametrize("rows", ["zeros", "constant", "one_spike", "tiny"])
def test_degenerate_rows_give_valid_finite_blocks(type_name: str, rows: str) -> None:
    w = torch.zeros(4, 256)
    if rows == "constant":
        w[:] = -0.37
    elif rows == "one_spike":
        w[:, 7] = 2.5
    elif rows == "tiny":
        w = _weight(4, 256) * 1e-3
    for imp in (None, torch.zeros(256), _skewed_importance(256)):
        q = quantize(w, type_name, imp)
        out = dequantize(q)
        assert torch.isfinite(out).all()
        np.testing.assert_array_equal(out.numpy().view(np.uint32), _gguf_dequantize(q).view(np.uint32))
        if rows == "zeros":
            assert not out.any()


def test_error_ordering_on_gaussian_rows() -> None:
    """Relative RMS error on N(0, 1) rows (65536 values: the estimates move by well under 1 %)."""
    w = _weight(64, 1024)
    err = {t: _rel_error(t, w) for t in QUANTIZABLE_TYPES}
    # Each K-quant step down costs at least 1.5x the error (measured: about 2x per bit).
    for better, worse in [("Q6_K", "Q5_K"), ("Q5_K", "Q4_K"), ("Q4_K", "Q3_K"), ("Q3_K", "Q2_K")]:
        assert err[better] * 1.5 < err[worse], (better, worse, err)
    # At fewer bits per weight the searched K-quants beat the legacy types (measured margins 7-17 %).
    assert err["Q4_K"] < 0.95 * err["Q4_1"] and err["Q4_K"] < 0.9 * err["Q4_0"], err
    assert err["Q5_K"] < 0.95 * err["Q5_1"] and err["Q5_K"] < 0.9 * err["Q5_0"], err
    assert err["Q3_K"] < 0.5 * err["TQ2_0"], err
    assert err["Q8_0"] < err["Q6_K"] and err["F16"] < err["Q8_0"], err
    # Sanity bounds from the grids' step sizes (measured: Q8_0 0.0053, Q4_K 0.071, Q2_K 0.29).
    assert err["Q8_0"] < 0.007 and err["Q4_K"] < 0.08 and err["Q2_K"] < 0.32, err


@pytest.mark.parametrize(
    "type_name", ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K", "TQ2_0", "TQ1_0"]
)
def test_importance_lowers_weighted_error(type_name: str) -> None:
    w = _weight()
    imp = _skewed_importance(w.shape[1])

    def weighted_error(out: torch.Tensor) -> float:
        return float(((out - w).square() * imp).sum())

    plain = weighted_error(fake_quantize(w, type_name))
    weighted = weighted_error(fake_quantize(w, type_name, imp))
    # Measured ratios 0.28-0.62 with this importance; 0.8 leaves room for seeds and platforms.
    assert weighted < 0.8 * plain


def test_illegal_row_length_is_refused() -> None:
    with pytest.raises(AutosquashError, match=r"Q4_K.*576"):
        quantize(torch.randn(8, 576), "Q4_K")
    with pytest.raises(AutosquashError, match=r"Q4_0.*40"):
        quantize(torch.randn(8, 40), "Q4_0")
    # 576 = 18 blocks of 32: legal for the legacy types.
    assert quantize(torch.randn(8, 576), "Q4_0").data.shape == (8, 18 * 18)


def test_bad_inputs_are_refused() -> None:
    w = _weight(4, 256)
    with pytest.raises(AutosquashError, match="IQ4_NL"):
        quantize(w, "IQ4_NL")
    with pytest.raises(AutosquashError, match="2-D"):
        quantize(w.reshape(-1), "Q8_0")
    with pytest.raises(AutosquashError, match="importance"):
        quantize(w, "Q4_K", torch.ones(255))
    with pytest.raises(AutosquashError, match="importance"):
        quantize(w, "Q4_K", -torch.ones(256))
    q = quantize(w, "Q4_K")
    with pytest.raises(AutosquashError, match="uint8"):
        dequantize(QuantizedTensor("Q4_K", (4, 512), q.data))


def test_type_names_are_case_insensitive_and_inputs_any_float() -> None:
    w = _weight(4, 256)
    q = quantize(w.to(torch.bfloat16), "q4_k")
    assert q.type == "Q4_K"
    assert torch.equal(dequantize(q), fake_quantize(w.to(torch.bfloat16).float(), "Q4_K"))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "TQ2_0", "TQ1_0"])
def test_weights_on_the_grid_come_back_unchanged(type_name: str) -> None:
    # SmolLM2 ships on a Q4_1 grid (DESIGN §5): re-quantizing to that grid must be free, with or
    # without importance (the search's candidates include the reference scale's codes).
    on_grid = fake_quantize(_weight(), type_name)
    assert torch.equal(fake_quantize(on_grid, type_name), on_grid)
    assert torch.equal(fake_quantize(on_grid, type_name, _skewed_importance(512)), on_grid)


def test_q8_0_keeps_the_reference_symmetric_range() -> None:
    # llama.cpp's Q8_0 never stores -128 and some int8 dot-product kernels rely on it.
    for imp in (None, _skewed_importance(512)):
        codes = quantize(_weight(), "Q8_0", imp).data.reshape(-1, 34)[:, 2:].view(np.int8)
        assert codes.min() >= -127


def test_gguf_file_round_trip(tmp_path) -> None:
    # What GGUFWriter stores and GGUFReader hands back is exactly our bytes, with the logical shape.
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    tensors = {t: quantize(_weight(8, 256), t) for t in ("F16", "Q4_K", "Q3_K", "TQ1_0", "Q5_1")}
    for name, q in tensors.items():
        writer.add_tensor(name, q.data, raw_dtype=GGMLQuantizationType[q.type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(str(path)).tensors:
        q = tensors[t.name]
        assert t.tensor_type == GGMLQuantizationType[q.type]
        assert tuple(int(d) for d in reversed(t.shape)) == q.shape  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(q.data.shape), q.data)
