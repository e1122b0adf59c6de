"""The compiled CPU decoders (formats/cpu_kernels.py) against the torch decoders a GPU runs, on the CPU."""

from __future__ import annotations

from collections.abc import Iterator

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import quantize
from autosquash.formats import codecs


@pytest.fixture
def torch_path() -> Iterator[None]:
    codecs.COMPILED_CPU = False
    yield
    codecs.COMPILED_CPU = True


def _case(seed: int = 0, extreme: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian weights and importance over a few orders of magnitude; `extreme` adds an outlier column and a
    channel of importance 1e6 (an attention sink's massive activation, as SmolLM2's layer 11 has)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(96, 512, generator=g)
    imp = torch.exp(2.0 * torch.randn(512, generator=g))
    if extreme:
        w[:, 5] *= 30
        imp[9] = 1e6
    return w, imp


# The compiled decoders' types and their f16 scale fields (d, and dmin where it has one), as byte ranges of a
# super-block. (Q2_K's and Q3_K's torch decoders were as fast as compiled ones: 0.05 s per 6.3M values.)
F16_FIELDS = {
    "Q4_K": slice(0, 4),
    "Q5_K": slice(0, 4),
    "Q6_K": slice(208, 210),
}


@pytest.mark.parametrize("type_name", tuple(F16_FIELDS))
def test_compiled_decoders_give_the_torch_decoders_values_exactly(type_name: str, torch_path: None) -> None:
    """Every bit of the codes and 6/8-bit scales exercised: blocks of random bytes, their f16 scales kept
    finite; both decoders, and gguf's, give the same float32 values."""
    w, _ = _case(3)
    q = quantize(w, type_name)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=q.data.shape, dtype=np.uint8).reshape(-1, q.data.shape[-1] // 2)
    s = F16_FIELDS[type_name]  # keep d (and dmin) what the quantizer wrote: finite f16
    data[:, s] = q.data.reshape(data.shape)[:, s]
    q = codecs.QuantizedTensor(type_name, q.shape, data.reshape(q.data.shape))
    plain = codecs.dequantize(q)
    codecs.COMPILED_CPU = True
    compiled = codecs.dequantize(q)
    assert torch.equal(compiled, plain)
    assert np.array_equal(compiled.numpy(), gguf.quants.dequantize(q.data, GGMLQuantizationType[type_name]))


@pytest.mark.parametrize("type_name", ("Q3_K", "Q6_K"))
def test_compiled_packers_write_the_torch_packers_bytes(type_name: str) -> None:
    """Every code and sub-block scale of the type's range, at random, with f16 scales of every magnitude: the
    compiled packer's bytes are the torch packer's."""
    g = torch.Generator().manual_seed(4)
    nmax, scale_nmax = {"Q3_K": (4, 32), "Q6_K": (32, 128)}[type_name]
    q = torch.randint(-nmax, nmax, (300, 256), dtype=torch.int8, generator=g)
    sc = torch.randint(-scale_nmax, scale_nmax, (300, 16), dtype=torch.int8, generator=g)
    d = torch.randn(300, generator=g) * torch.logspace(-6, 4, 300)
    pack = {"Q3_K": codecs.pack_q3_k, "Q6_K": codecs.pack_q6_k}[type_name]
    compiled = pack((d, sc), q)
    codecs.COMPILED_CPU = False
    try:
        plain = pack((d, sc.to(torch.float32)), q.to(torch.float32))
    finally:
        codecs.COMPILED_CPU = True
    assert torch.equal(compiled, plain)
