"""GGUF block types as bytes: ggml's block layouts (ggml-common.h), the packing of a type's scale fields and codes
into them, and decoders with the arithmetic of gguf.quants.dequantize (the same float32 values, bit for bit).

One section per type family: the legacy types (blocks of 32), the K-quants and the ternary types (super-blocks of
256), the non-linear IQ4_NL/IQ4_XS and the float types; the lattice types IQ3_S .. IQ2_XXS are in iq_lattice. A
type's `pack_*` takes its scale fields and codes as the type stores them; choosing them (the importance-weighted
scale searches and ggml's reference quantizers) is autosquash.compress.quantize's. The bit-level pieces are in
bits; on a CPU the Q4_K, Q5_K and Q6_K decoders and the Q3_K and Q6_K packers run compiled (cpu_kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from autosquash.errors import AutosquashError
from autosquash.formats import cpu_kernels
from autosquash.formats.bits import f16_bytes, pack_bits, read_f16, unpack_bits
from autosquash.formats.gguf_types import tensor_type
from autosquash.formats.iq_lattice import LATTICE_DECODERS
from autosquash.formats.slices import for_each_slice

QK_K = 256  # values per K-quant / ternary super-block
# On a CPU: compiled kernels (cpu_kernels, compress.quantize.kernels), or torch's as on a GPU (tests compare them).
COMPILED_CPU = True

Decoder = Callable[[Tensor], Tensor]
Scales = tuple[Tensor, ...]  # a block's stored scale fields, as a type's pack function takes them


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight matrix in one GGUF type; `data` is uint8 (rows, bytes_per_row), the bytes GGUFWriter stores.

    For F16/F32, `data.view(np.float16 / np.float32)` is what `gguf.quants.quantize` returns; write any
    type with `GGUFWriter.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type])`.
    """

    type: str
    shape: tuple[int, int]
    data: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# On a CPU: compiled kernels or torch's ops


def compiled(t: Tensor) -> bool:
    """Whether work on `t` runs the compiled CPU kernels rather than torch's ops."""
    return t.device.type == "cpu" and COMPILED_CPU


def numpy32(t: Tensor) -> np.ndarray:
    """A CPU tensor as a C-contiguous float32 array (no copy when it is one already)."""
    return t.detach().to(torch.float32).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------------
# Legacy types: 32 values per block (block_q8_0, block_q5_0, block_q5_1, block_q4_0, block_q4_1)


def pack_q8_0(s: Scales, q: Tensor) -> Tensor:
    """Q8_0 blocks from (d,) and int8 codes."""
    return torch.cat([f16_bytes(s[0]), q.to(torch.int8).view(torch.uint8)], dim=-1)


def _decode_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * read_f16(b[:, :2])


def pack_q4_0(s: Scales, q: Tensor) -> Tensor:
    """Q4_0 blocks from (d,) and codes in [-8, 7]."""
    return torch.cat([f16_bytes(s[0]), pack_bits((q + 8).view(-1, 2, 16), 4)], dim=-1)


def _decode_q4_0(b: Tensor) -> Tensor:
    q = unpack_bits(b[:, 2:], 4, 2).reshape(-1, 32).to(torch.int8) - 8
    return read_f16(b[:, :2]) * q.to(torch.float32)


def pack_q4_1(s: Scales, q: Tensor) -> Tensor:
    """Q4_1 blocks from (d, min) and codes in [0, 15]."""
    return torch.cat([f16_bytes(s[0]), f16_bytes(s[1]), pack_bits(q.view(-1, 2, 16), 4)], dim=-1)


def _decode_q4_1(b: Tensor) -> Tensor:
    q = unpack_bits(b[:, 4:], 4, 2).reshape(-1, 32).to(torch.float32)
    return read_f16(b[:, :2]) * q + read_f16(b[:, 2:4])


def _pack_q5(q: Tensor) -> tuple[Tensor, Tensor]:
    """(qh, qs) of block_q5_x: bit i of the little-endian uint32 qh is bit 4 of value i; low nibbles as Q4."""
    qh = pack_bits((q.to(torch.uint8) >> 4).view(-1, 4, 8).transpose(-1, -2), 1)
    return qh, pack_bits((q.to(torch.uint8) & 15).view(-1, 2, 16), 4)


def _unpack_q5(qh: Tensor, qs: Tensor) -> Tensor:
    high = unpack_bits(qh, 1, 8).transpose(-1, -2).reshape(-1, 32)
    return unpack_bits(qs, 4, 2).reshape(-1, 32) | (high << 4)


def pack_q5_0(s: Scales, q: Tensor) -> Tensor:
    """Q5_0 blocks from (d,) and codes in [-16, 15]."""
    return torch.cat([f16_bytes(s[0]), *_pack_q5(q + 16)], dim=-1)


def _decode_q5_0(b: Tensor) -> Tensor:
    q = _unpack_q5(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16
    return read_f16(b[:, :2]) * q.to(torch.float32)


def pack_q5_1(s: Scales, q: Tensor) -> Tensor:
    """Q5_1 blocks from (d, min) and codes in [0, 31]."""
    return torch.cat([f16_bytes(s[0]), f16_bytes(s[1]), *_pack_q5(q)], dim=-1)


def _decode_q5_1(b: Tensor) -> Tensor:
    q = _unpack_q5(b[:, 4:8], b[:, 8:]).to(torch.float32)
    return read_f16(b[:, :2]) * q + read_f16(b[:, 2:4])


# ---------------------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 (block_q2_K .. block_q6_K)


def _pack_k_scales(sc: Tensor, m: Tensor) -> Tensor:
    """12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks (get_scale_min_k4 layout)."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat([low, mid, high], dim=-1)


def _unpack_k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    low, mid, high = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([low & 63, (high & 15) | ((low >> 2) & 48)], dim=-1)
    m = torch.cat([mid & 63, (high >> 4) | ((mid >> 2) & 48)], dim=-1)
    return sc, m


def pack_q2_k(s: Scales, q: Tensor) -> Tensor:
    """Q2_K super-blocks from (d, dmin, 4-bit sc, 4-bit m per sub-block of 16) and codes in [0, 3]."""
    d, dmin, sc, m = s
    scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)
    qs = pack_bits(q.view(-1, 2, 4, 32), 2).view(-1, 64)
    return torch.cat([scales, qs, f16_bytes(d), f16_bytes(dmin)], dim=-1)


def _compiled_decode(b: Tensor, name: str, out: Tensor | None = None) -> Tensor:
    """b's super-blocks of type `name` decoded by its compiled kernel (`_COMPILED_DECODERS`: the kernel takes the
    bytes, the f16 fields at their byte offsets (d, or d and dmin) as float32, its arguments, then its output),
    into `out` (N, 256) if given."""
    kernel, f16_at, args = _COMPILED_DECODERS[name]
    out = torch.empty(b.shape[0], QK_K, device=b.device) if out is None else out
    scales = [numpy32(read_f16(b[:, a : a + 2])).ravel() for a in f16_at]
    kernel(b.contiguous().numpy(), *scales, *args, out.numpy())
    return out


def _decode_q2_k(b: Tensor) -> Tensor:
    scales = b[:, :16]
    q = unpack_bits(b[:, 16:80].reshape(-1, 2, 32), 2, 4).reshape(-1, 16, 16).to(torch.float32)
    dl = read_f16(b[:, 80:82]) * (scales & 15).to(torch.float32)
    ml = read_f16(b[:, 82:84]) * (scales >> 4).to(torch.float32)
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(-1, QK_K)


def _compiled_pack(kernel: Callable, nbytes: int, d: Tensor, sc: Tensor, q: Tensor) -> Tensor:
    """Super-blocks packed by cpu_kernels.pack_* from the codes and sub-block scales; f16 d in the last 2 bytes."""
    out = torch.empty(q.shape[0], nbytes, dtype=torch.uint8, device=q.device)
    kernel(q.to(torch.int8).contiguous().numpy(), sc.to(torch.int8).contiguous().numpy(), out.numpy())
    out[:, -2:] = f16_bytes(d)
    return out


def pack_q3_k(s: Scales, q: Tensor) -> Tensor:
    """Q3_K super-blocks from (d, 6-bit signed sc per sub-block of 16) and codes in [-4, 3]."""
    d, sc = s
    if compiled(q):
        return _compiled_pack(cpu_kernels.pack_q3_k, 110, d, sc, q)
    q = (q + 4).to(torch.uint8)  # bit 2 goes to hmask (set means no -4 offset), bits 0-1 to qs
    hmask = pack_bits((q >> 2).view(-1, 8, 32), 1)
    qs = pack_bits((q & 3).view(-1, 2, 4, 32), 2).view(-1, 64)
    s = (sc + 32).to(torch.uint8)
    scales = torch.cat([pack_bits((s & 15).view(-1, 2, 8), 4), pack_bits((s >> 4).view(-1, 4, 4), 2)], dim=-1)
    return torch.cat([hmask, qs, scales, f16_bytes(d)], dim=-1)


def _decode_q3_k(b: Tensor) -> Tensor:
    high = unpack_bits(b[:, :32], 1, 8).reshape(-1, 16, 16)
    low = unpack_bits(b[:, 32:96].reshape(-1, 2, 32), 2, 4).reshape(-1, 16, 16)
    s = unpack_bits(b[:, 96:104], 4, 2).reshape(-1, 16) | (unpack_bits(b[:, 104:108], 2, 4).reshape(-1, 16) << 4)
    dl = read_f16(b[:, 108:110]) * (s.to(torch.int8) - 32).to(torch.float32)
    q = (low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)).to(torch.float32)
    return (dl.unsqueeze(-1) * q).reshape(-1, QK_K)


def pack_q4_k(s: Scales, q: Tensor) -> Tensor:
    """Q4_K super-blocks from (d, dmin, 6-bit sc, 6-bit m per sub-block of 32) and codes in [0, 15]."""
    d, dmin, sc, m = s
    qs = pack_bits(q.view(-1, 4, 2, 32), 4).view(-1, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), _pack_k_scales(sc, m), qs], dim=-1)


def _decode_k_affine(b: Tensor, q: Tensor) -> Tensor:
    """Q4_K/Q5_K: (d * sc) * q - (dmin * m) per sub-block of 32, codes q (N, 8, 32) already unpacked."""
    sc, m = _unpack_k_scales(b[:, 4:16])
    scale = read_f16(b[:, :2]) * sc.to(torch.float32)
    mn = read_f16(b[:, 2:4]) * m.to(torch.float32)
    return (scale.unsqueeze(-1) * q.to(torch.float32) - mn.unsqueeze(-1)).reshape(-1, QK_K)


def _decode_q4_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, "Q4_K")
    return _decode_k_affine(b, unpack_bits(b[:, 16:].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32))


def pack_q5_k(s: Scales, q: Tensor) -> Tensor:
    """Q5_K super-blocks from (d, dmin, 6-bit sc, 6-bit m per sub-block of 32) and codes in [0, 31]."""
    d, dmin, sc, m = s
    q = q.to(torch.uint8)
    qh = pack_bits((q >> 4).view(-1, 8, 32), 1)
    qs = pack_bits((q & 15).view(-1, 4, 2, 32), 4).view(-1, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), _pack_k_scales(sc, m), qh, qs], dim=-1)


def _decode_q5_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, "Q5_K")
    high = unpack_bits(b[:, 16:48], 1, 8)
    low = unpack_bits(b[:, 48:].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32)
    return _decode_k_affine(b, low | (high << 4))


def pack_q6_k(s: Scales, q: Tensor) -> Tensor:
    """Q6_K super-blocks from (d, 8-bit signed sc per sub-block of 16) and codes in [-32, 31]."""
    d, sc = s
    if compiled(q):
        return _compiled_pack(cpu_kernels.pack_q6_k, 210, d, sc, q)
    q = (q + 32).to(torch.uint8)
    ql = pack_bits((q & 15).view(-1, 2, 2, 64), 4).view(-1, 128)
    qh = pack_bits((q >> 4).view(-1, 2, 4, 32), 2).view(-1, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=-1)


def _decode_q6_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, "Q6_K")
    low = unpack_bits(b[:, :128].reshape(-1, 2, 64), 4, 2).reshape(-1, QK_K)
    high = unpack_bits(b[:, 128:192].reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K)
    q = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32).view(-1, 16, 16)
    scale = read_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return (scale.unsqueeze(-1) * q).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Ternary types: super-blocks of 256, values d * {-1, 0, 1} (block_tq1_0, block_tq2_0)


def pack_tq2_0(s: Scales, q: Tensor) -> Tensor:
    """TQ2_0 super-blocks from (d,) and codes in {-1, 0, 1}."""
    return torch.cat([pack_bits((q + 1).view(-1, 2, 4, 32), 2).view(-1, 64), f16_bytes(s[0])], dim=-1)


def _decode_tq2_0(b: Tensor) -> Tensor:
    q = unpack_bits(b[:, :64].reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K).to(torch.int8) - 1
    return read_f16(b[:, 64:66]) * q.to(torch.float32)


# TQ1_0 packs 5 trits per byte as a base-3 fixed-point fraction: byte = ceil(sum t_k 3^(4-k) * 256 / 243),
# so multiplying the byte by 3^k (mod 256) brings trit k to the top, where (b * 3) >> 8 reads it.
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_tq1_0(s: Scales, q: Tensor) -> Tensor:
    """TQ1_0 super-blocks from (d,) and codes in {-1, 0, 1}."""
    d = s[0]
    q = (q + 1).to(torch.int32)
    place = _POW3.to(q.device).flip(0).reshape(5, 1)
    qs0 = (q[:, :160].view(-1, 5, 32) * place).sum(1)
    qs1 = (q[:, 160:240].view(-1, 5, 16) * place).sum(1)
    qh = (q[:, 240:].view(-1, 4, 4) * place[:4]).sum(1)
    packed = (torch.cat([qs0, qs1, qh], dim=-1) * 256 + 242) // 243
    return torch.cat([packed.to(torch.uint8), f16_bytes(d)], dim=-1)


def _decode_tq1_0(b: Tensor) -> Tensor:
    def trits(bytes_: Tensor, count: int) -> Tensor:
        top = (bytes_.to(torch.int32).unsqueeze(-2) * _POW3[:count].to(b.device).reshape(count, 1)) & 255
        return ((top * 3) >> 8).reshape(bytes_.shape[0], -1)

    q = torch.cat([trits(b[:, :32], 5), trits(b[:, 32:48], 5), trits(b[:, 48:52], 4)], dim=-1) - 1
    return read_f16(b[:, 52:54]) * q.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Non-linear 4-bit types: value = scale * kvalues_iq4nl[q] (block_iq4_nl: blocks of 32; block_iq4_xs:
# super-blocks of 256 whose 8 sub-blocks of 32 share an f16 d through 6-bit scales)

# ggml's kvalues_iq4nl: 16 levels, denser near 0, one more on the negative side (as Q4_0's -8..7).
IQ4_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.0])


def _pack_iq4(q: Tensor) -> Tensor:
    """16 bytes per 32 indices: byte j holds q[j] in its low nibble, q[j + 16] in its high one."""
    return pack_bits(q.view(-1, 2, 16), 4)


def _unpack_iq4(b: Tensor) -> Tensor:
    """(N, 16 k) bytes -> (N, 32 k) grid values as float32."""
    q = unpack_bits(b.reshape(b.shape[0], -1, 16), 4, 2).reshape(b.shape[0], -1)
    return IQ4_VALUES.to(b.device).index_select(0, q.reshape(-1).to(torch.int32)).view(q.shape)


def pack_iq4_nl(s: Scales, q: Tensor) -> Tensor:
    """IQ4_NL blocks from (d,) and indices of IQ4_VALUES."""
    return torch.cat([f16_bytes(s[0]), _pack_iq4(q)], dim=-1)


def _decode_iq4_nl(b: Tensor) -> Tensor:
    return read_f16(b[:, :2]) * _unpack_iq4(b[:, 2:])


def pack_iq4_xs(s: Scales, q: Tensor) -> Tensor:
    """IQ4_XS super-blocks from (d, 6-bit signed sc per sub-block of 32) and indices of IQ4_VALUES."""
    d, sc = s
    n = q.shape[0]
    ls = (sc + 32).to(torch.uint8)
    scales_h = pack_bits((ls >> 4).view(-1, 2, 4).transpose(-1, -2), 2)  # little-endian u16, 2 bits per sub-block
    scales_l = pack_bits((ls & 15).view(-1, 4, 2).transpose(-1, -2), 4)  # sub-block 2i low nibble, 2i+1 high
    return torch.cat([f16_bytes(d), scales_h, scales_l, _pack_iq4(q.reshape(-1, 32)).view(n, 128)], dim=-1)


def _decode_iq4_xs(b: Tensor) -> Tensor:
    high = unpack_bits(b[:, 2:4], 2, 4).transpose(-1, -2).reshape(-1, 8)
    low = unpack_bits(b[:, 4:8], 4, 2).transpose(-1, -2).reshape(-1, 8)
    dl = read_f16(b[:, :2]) * ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    return (dl.unsqueeze(-1) * _unpack_iq4(b[:, 8:]).view(-1, 8, 32)).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Float types (block size 1)


def pack_f32(x: Tensor) -> Tensor:
    """F32 rows: the values' bytes."""
    return x.contiguous().view(torch.uint8)


def _decode_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def pack_f16(x: Tensor) -> Tensor:
    """F16 rows: the values rounded to float16, their bytes."""
    return x.to(torch.float16).view(torch.uint8)


def _decode_f16(b: Tensor) -> Tensor:
    return read_f16(b)


# The compiled decoders (cpu_kernels): kernel, byte offsets of the f16 fields, the kernel's other arguments.
_COMPILED_DECODERS: dict[str, tuple[Callable, tuple[int, ...], tuple[int, ...]]] = {
    "Q4_K": (cpu_kernels.decode_k_affine, (0, 2), (16, -1)),
    "Q5_K": (cpu_kernels.decode_k_affine, (0, 2), (48, 16)),
    "Q6_K": (cpu_kernels.decode_q6_k, (208,), ()),
}
_DECODERS: dict[str, Decoder] = {
    "F32": _decode_f32,
    "F16": _decode_f16,
    "Q8_0": _decode_q8_0,
    "Q6_K": _decode_q6_k,
    "Q5_1": _decode_q5_1,
    "Q5_K": _decode_q5_k,
    "Q5_0": _decode_q5_0,
    "Q4_1": _decode_q4_1,
    "Q4_K": _decode_q4_k,
    "Q4_0": _decode_q4_0,
    "Q3_K": _decode_q3_k,
    "Q2_K": _decode_q2_k,
    "TQ2_0": _decode_tq2_0,
    "TQ1_0": _decode_tq1_0,
    "IQ4_NL": _decode_iq4_nl,
    "IQ4_XS": _decode_iq4_xs,
    **LATTICE_DECODERS,  # IQ3_S .. IQ2_XXS (autosquash.formats.iq_lattice)
}
# The types autosquash writes and reads (autosquash.compress.quantize has an encoder for each).
QUANTIZABLE_TYPES: tuple[str, ...] = tuple(_DECODERS)


def quantizable_type(type_name: str) -> str:
    """The canonical name of GGUF type `type_name`, one of QUANTIZABLE_TYPES (AutosquashError otherwise)."""
    name = tensor_type(type_name).name
    if name not in _DECODERS:
        raise AutosquashError(f"cannot quantize to GGUF type {name}; expected one of {', '.join(_DECODERS)}")
    return name


def dequantize(q: QuantizedTensor, device: torch.device | str | None = None) -> Tensor:
    """Decode `q` to float32 (shape q.shape) with the arithmetic of gguf.quants.dequantize (ggml layouts),
    on `device` (the CPU by default): the bytes travel there, not the four-times-larger floats."""
    name = quantizable_type(q.type)
    t = tensor_type(name)
    rows, cols = q.shape
    expected = (rows, t.nbytes((1, cols)))
    if q.data.dtype != np.uint8 or tuple(q.data.shape) != expected:
        raise AutosquashError(
            f"{name} data for shape {q.shape} must be uint8 of shape {expected}; got {q.data.dtype} {q.data.shape}"
        )
    if device is not None and torch.device(device).type != "cpu":
        return decode_rows(torch.from_numpy(np.array(q.data, copy=True)).to(device), name, cols)
    # On a CPU, slices of rows decode on torch's threads at once (the compiled decoders run one thread each),
    # each slice's bytes copied (the file's may be a read-only map) and decoded into its rows of the output.
    out = torch.empty(rows, cols, device="cpu")

    def work(a: int, z: int) -> None:
        decode_rows(torch.from_numpy(np.array(q.data[a:z])), name, cols, out[a:z])

    for_each_slice(out.device, rows, max(1, -(-rows // (4 * torch.get_num_threads()))), work)
    return out


def decode_rows(data: Tensor, type_name: str, cols: int, out: Tensor | None = None) -> Tensor:
    """Bytes (rows, row bytes) uint8 of type `type_name` decoded to float32 (rows, cols) on their device, into
    `out` (contiguous) if given: a type with a compiled decoder writes there directly."""
    name = quantizable_type(type_name)
    blocks = data.reshape(-1, tensor_type(name).block_bytes)
    if out is not None and name in _COMPILED_DECODERS and compiled(data):
        _compiled_decode(blocks, name, out.view(-1, QK_K))
        return out
    values = _DECODERS[name](blocks).reshape(data.shape[0], cols)
    return values if out is None else out.copy_(values)
