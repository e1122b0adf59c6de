"""Quantization to GGUF types: gguf-writer agreement, degenerate rows, error ordering, importance weighting, the
no-worse quantizer, slices on threads."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress import quantize as quantizer
from autosquash.compress.quantize import (
    fake_quantize,
    importance_floor,
    no_worse_rows,
    quantize,
    quantize_no_worse,
)
from autosquash.compress.quantize.encoders import ENCODERS
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor, dequantize
from autosquash.formats.gguf_types import tensor_type
from autosquash.formats.slices import for_each_slice
from tests.formats.test_codecs import (  # noqa: F401  (_one_thread: autouse, one torch thread here too, as there)
    KVALUES_IQ4NL,
    _gguf_dequantize,
    _hand_packed_iq4_xs_case,
    _one_thread,
    _skewed_importance,
    _weight,
)

# Types gguf.quants.quantize writes too; without importance ours must reproduce its bytes exactly.
GGUF_WRITES = ("F32", "F16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "TQ2_0", "TQ1_0")


def _rel_error(t: str, w: torch.Tensor) -> float:
    return float((fake_quantize(w, t) - w).norm() / w.norm())


def test_every_type_formats_decodes_has_an_encoder() -> None:
    assert tuple(ENCODERS) == QUANTIZABLE_TYPES


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
    # The non-linear grid beats Q4_0's uniform one at the same 4.5 bits, IQ4_XS at 4.25 (measured 11 %, 10 %).
    assert err["IQ4_NL"] < 0.95 * err["Q4_0"] and err["IQ4_XS"] < 0.95 * err["Q4_0"], err
    assert err["Q8_0"] < err["Q6_K"] and err["F16"] < err["Q8_0"], err
    # Sanity bounds from the grids' step sizes (measured: Q8_0 0.0053, Q4_K 0.071, Q2_K 0.29).
    assert err["Q8_0"] < 0.007 and err["Q4_K"] < 0.08 and err["Q2_K"] < 0.32, err


@pytest.mark.parametrize("type_name", [t for t in QUANTIZABLE_TYPES if t not in ("F32", "F16")])
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
    with pytest.raises(AutosquashError, match="IQ1_M"):
        quantize(w, "IQ1_M")
    with pytest.raises(AutosquashError, match="2-D"):
        quantize(w.reshape(-1), "Q8_0")
    with pytest.raises(AutosquashError, match="importance"):
        quantize(w, "Q4_K", torch.ones(255))
    with pytest.raises(AutosquashError, match="importance"):
        quantize(w, "Q4_K", -torch.ones(256))


def test_type_names_are_case_insensitive_and_inputs_any_float() -> None:
    w = _weight(4, 256)
    q = quantize(w.to(torch.bfloat16), "q4_k")
    assert q.type == "Q4_K"
    assert torch.equal(dequantize(q), fake_quantize(w.to(torch.bfloat16).float(), "Q4_K"))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "TQ2_0", "TQ1_0"])
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


# ---------------------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS: ggml's non-linear 4-bit grid, which gguf.quants decodes but does not write


def _with_outliers_and_zero_rows(rows: int = 64, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < 0.01] *= 8  # one value in a hundred 8x larger
    w[3] = 0.0
    w[9, :256] = 0.0  # a zero super-block in an otherwise normal row
    w[12, 32:64] = 0.0  # a zero block
    w[20, 5] = 40.0  # a lone spike
    return w


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_bytes_decode_like_gguf_with_outliers_and_zero_rows(type_name: str, with_importance: bool) -> None:
    w = _with_outliers_and_zero_rows()
    imp = _skewed_importance(w.shape[1]) if with_importance else None
    q = quantize(w, type_name, imp)
    assert q.data.shape == gguf.quants.quant_shape_to_byte_shape(q.shape, GGMLQuantizationType[type_name])
    ours = dequantize(q)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), _gguf_dequantize(q).view(np.uint32))
    assert not ours[3].any() and not ours[9, :256].any() and not ours[12, 32:64].any()
    # The spike sets its block's scale: within half a step between the outer levels (89, 113, 127 apart by 10 % or
    # more); measured within 0.1 % and, IQ4_XS with importance, 4 % (its 6-bit sub-block scale).
    assert abs(float(ours[20, 5]) - 40.0) < 0.05 * 40.0


def test_iq4_xs_encoder_picks_back_a_hand_packed_block() -> None:
    # The encoder picks back exactly these indices and scales from the decoded values (the largest value of
    # each sub-block at -127 and the largest sub-block scale at -32 are among its candidates).
    data, expected, _, _ = _hand_packed_iq4_xs_case()
    np.testing.assert_array_equal(quantize(torch.from_numpy(expected.reshape(1, 256)), "IQ4_XS").data, data)


def _round_to_nearest_scale(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """The plain baseline (ggml's quantize_row_iq4_nl_ref): each block's largest-magnitude value mapped to the
    -127 level, every value to its nearest level; IQ4_XS's sub-block scales rounded onto 6 bits of d, with the
    largest at -32."""

    def signed_max(b: np.ndarray) -> np.ndarray:
        return np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]

    def inverse(s: np.ndarray) -> np.ndarray:
        return np.where(s == 0, 0.0, 1.0 / np.where(s == 0, 1.0, s)).astype(np.float32)

    x = w.numpy().reshape(-1, 32)
    s = signed_max(x) / -127
    if type_name == "IQ4_NL":
        s = s.astype(np.float16).astype(np.float32)
    else:
        s = s.reshape(-1, 8)
        d = (signed_max(s) / -32).astype(np.float16).astype(np.float32)
        s = (d[:, None] * np.clip(np.round(s * inverse(d)[:, None]), -32, 31)).reshape(-1)
    v = x * inverse(s)[:, None]
    nearest = KVALUES_IQ4NL[np.abs(v[..., None] - KVALUES_IQ4NL).argmin(-1)]
    return torch.from_numpy(s[:, None] * nearest).reshape(w.shape)


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_search_beats_round_to_nearest_scale(type_name: str) -> None:
    w = _with_outliers_and_zero_rows()
    imp = _skewed_importance(w.shape[1])
    baseline = _round_to_nearest_scale(w, type_name)

    def error(out: torch.Tensor, weight: torch.Tensor) -> float:
        return float(((out - w).square() * weight).sum())

    # With importance, its weighted error; without, the x^2-weighted error llama.cpp's IQ4 search minimises
    # then. Measured ratios: 0.68 / 0.70 and 0.77 / 0.78 (IQ4_NL / IQ4_XS).
    assert error(fake_quantize(w, type_name, imp), imp) < 0.8 * error(baseline, imp)
    assert error(fake_quantize(w, type_name), w.square()) < 0.9 * error(baseline, w.square())


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1"])
def test_a_weight_on_the_grid_stays_exact_beside_an_input_channel_of_massive_activations(type_name: str) -> None:
    # SmolLM2's layer-11 down_proj has an input channel with E[x²] 10^6 times its neighbours' (an attention
    # sink's massive activation). The affine fit's sums then cancel in float32 unless they are centred, and
    # every block of that column was coded as one value (error up to 7.0 on a Q4_1 file re-quantized to Q4_1).
    g = torch.Generator().manual_seed(3)
    w = dequantize(quantize(torch.randn(8, 256, generator=g), type_name))
    importance = torch.full((256,), 0.02)
    importance[45] = 3.4e4
    assert torch.equal(dequantize(quantize(w, type_name, importance)), w)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q4_K", "Q3_K", "IQ4_XS"])
def test_no_worse_quantization_keeps_the_better_block_of_weighted_and_reference(type_name):
    torch.manual_seed(0)
    w = torch.randn(1100, 256)  # rows compared in slices of 512: two whole and a part
    imp = torch.rand(256) ** 4 * 100  # channels' weights spread over orders of magnitude
    x_ref, x_imp = fake_quantize(w, type_name), fake_quantize(w, type_name, imp)
    best = dequantize(quantize_no_worse(w, type_name, imp))
    block = tensor_type(type_name).block_size

    def errors(x):
        return ((x - w).square() * imp).reshape(-1, block).sum(-1)

    torch.testing.assert_close(errors(best), torch.minimum(errors(x_ref), errors(x_imp)))
    assert errors(best).sum() < errors(x_ref).sum()  # the weighting pays on most blocks
    # The values it hands the compensated quantizer are what its bytes decode to (a K-quant's and an IQ4's are
    # worked out from scales and codes, not decoded).
    data, values = no_worse_rows(w, type_name, importance_floor(imp, 256, w.device))
    assert torch.equal(values, dequantize(QuantizedTensor(type_name, tuple(w.shape), data.numpy())))
    if type_name in ("Q8_0", "Q5_1"):
        # A weight already on a legacy grid (what a quantized base model's file holds) comes back exactly. (A
        # K-quant's reference search need not find its own grid again: one super-block of 1100 rows here did not.)
        torch.testing.assert_close(dequantize(quantize_no_worse(x_ref, type_name, imp)), x_ref, rtol=0, atol=0)


def test_slices_run_one_per_thread_on_one_torch_thread_each_and_give_one_threads_bytes(monkeypatch) -> None:
    # OpenMP barriers after every call stall when a core is shared (two threads were 10x slower than one), so
    # with two torch threads the slices run on two Python threads of one torch thread each; the bytes do not
    # change, and the caller's thread count comes back.
    monkeypatch.setattr(quantizer, "_CHUNK_VALUES", 8 * 512)
    w, imp = _weight(), _skewed_importance(512)

    def made() -> list[np.ndarray]:
        return [quantize(w, "Q4_K", imp).data, quantize_no_worse(w, "Q4_K", imp).data, quantize(w, "Q4_0").data]

    one = made()
    seen = []
    torch.set_num_threads(2)
    try:
        for_each_slice(torch.device("cpu"), 10, 3, lambda a, b: seen.append((a, b, torch.get_num_threads())))
        assert torch.get_num_threads() == 2
        two = made()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert sorted(seen) == [(0, 3, 1), (3, 6, 1), (6, 9, 1), (9, 10, 1)]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)
