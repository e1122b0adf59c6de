"""GGUF block types as bytes: the layouts gguf reads, decoders that give gguf's values bit for bit, a GGUF file round
trip. (The quantizers that write these bytes are tests/compress/quantize's.)"""

from __future__ import annotations

from collections.abc import Iterator

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import fake_quantize, quantize
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor, dequantize
from autosquash.formats.gguf_types import tensor_type


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


def test_bytes_of_the_wrong_shape_are_refused() -> None:
    q = quantize(_weight(4, 256), "Q4_K")
    with pytest.raises(AutosquashError, match="uint8"):
        dequantize(QuantizedTensor("Q4_K", (4, 512), q.data))


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


# ---------------------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS: ggml's non-linear 4-bit grid, which gguf.quants decodes but does not write

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _hand_packed_iq4_xs(d: float, ls: np.ndarray, q: np.ndarray) -> np.ndarray:
    """One block_iq4_xs packed from ggml-common.h's description, byte by byte: f16 d, u16 scales_h (2 bits per
    sub-block at bits 2 ib), u8 scales_l[4] (sub-block ib in nibble ib % 2 of byte ib / 2), then per sub-block
    16 bytes whose byte j holds index j in its low nibble and index j + 16 in its high one."""
    out = bytearray(np.float16(d).tobytes())
    out += int(sum(int(ls[ib] >> 4) << (2 * ib) for ib in range(8))).to_bytes(2, "little")
    out += bytes(int(ls[2 * i] & 15) | int(ls[2 * i + 1] & 15) << 4 for i in range(4))
    for ib in range(8):
        out += bytes(int(q[ib, j]) | int(q[ib, j + 16]) << 4 for j in range(16))
    return np.frombuffer(bytes(out), np.uint8).reshape(1, -1)


def _hand_packed_iq4_xs_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One block_iq4_xs by hand: its bytes, the values (8, 32) they stand for, its indices q (8, 32) and its d."""
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (8, 32))
    q[:, 0] = 0  # each sub-block reaches the -127 level, and the first one holds the super-block's largest scale
    ls = np.array([0, 5, 17, 30, 36, 41, 50, 63])
    d = 0.0137
    expected = np.float32(np.float16(d)) * (ls - 32).astype(np.float32)[:, None] * KVALUES_IQ4NL[q]
    return _hand_packed_iq4_xs(d, ls, q), expected, q, d


def test_iq4_layouts_are_ggmls() -> None:
    data, expected, q, d = _hand_packed_iq4_xs_case()
    theirs = gguf.quants.dequantize(data, GGMLQuantizationType.IQ4_XS)
    for decoded in (theirs, dequantize(QuantizedTensor("IQ4_XS", (1, 256), data)).numpy()):
        np.testing.assert_array_equal(decoded.reshape(8, 32), expected)
    # IQ4_NL: f16 d, then the same 16 bytes as one IQ4_XS sub-block.
    nl = np.concatenate([data[:, :2], data[:, 8:24]], axis=1)
    expected_nl = np.float32(np.float16(d)) * KVALUES_IQ4NL[q[0]]
    np.testing.assert_array_equal(gguf.quants.dequantize(nl, GGMLQuantizationType.IQ4_NL).reshape(32), expected_nl)
    np.testing.assert_array_equal(dequantize(QuantizedTensor("IQ4_NL", (1, 32), nl)).numpy().reshape(32), expected_nl)
