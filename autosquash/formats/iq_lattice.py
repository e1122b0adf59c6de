"""ggml's lattice types IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS and IQ2_XXS: the bytes of ggml-common.h's block_iq3_s ..
block_iq2_xxs, packed from their fields, and decoders with gguf.quants' float32 arithmetic.

The format, shared by all five: a super-block of 256 values holds an f16 `d` and, per sub-block of 32 values (16
for IQ2_S and IQ2_XS), a 4-bit code s: the sub-block's step is d * unit * (2 s + 1). Its values come in groups of 8
(IQ2) or 4 (IQ3), each stored as the index of a point of a fixed grid of magnitudes (256 to 1024 of the 3^8 or 8^4
combinations of 3 or 8 levels) and a sign per value: 8 sign bits per 8 values, or 7 (IQ2_XXS, IQ2_XS, IQ3_XXS),
the eighth making the count of minus signs even. The grids and the 7-bit sign table are data in the gguf package
(gguf.quants.IQ2_XXS.grid_hex, ksigns, ...), read from there. Choosing the fields for given values (the
importance-weighted search) is autosquash.compress.quantize.lattice's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import gguf.quants
import torch
from torch import Tensor

from autosquash.formats.bits import f16_bytes, read_f16

QK_K = 256


@dataclass(frozen=True)
class Lattice:
    """One lattice type's format: groups of `group` values on the gguf grid `name`, a 4-bit scale per `sub`
    values, step d * unit * (2 s + 1), and 7 sign bits per 8 values when `parity`."""

    name: str
    group: int
    sub: int
    unit: float
    parity: bool


IQ3_S = Lattice("IQ3_S", 4, 32, 1.0, False)
IQ3_XXS = Lattice("IQ3_XXS", 4, 32, 0.25, True)
IQ2_S = Lattice("IQ2_S", 8, 16, 0.125, False)
IQ2_XS = Lattice("IQ2_XS", 8, 16, 0.125, True)
IQ2_XXS = Lattice("IQ2_XXS", 8, 32, 0.125, True)


@functools.cache
def lattice_grid(name: str, device: torch.device) -> Tensor:
    """The grid of lattice type `name`, (J, D) magnitudes as float32 as gguf.quants decodes them, on `device`."""
    source = getattr(gguf.quants, name)
    source.init_grid()
    return torch.from_numpy(source.grid.reshape(source.grid_shape).copy()).to(device)


def lattice_step(d: Tensor, s: Tensor, lat: Lattice) -> Tensor:
    """Each sub-block's float32 step from f16 d and its codes s (float), in gguf.quants' order of operations: one
    rounding, of d * (0.5 + s), then an exact power-of-two factor (IQ3_S's d * (1 + 2 s) is the same number)."""
    return d * (0.5 + s) * (2 * lat.unit)


def _decode(d: Tensor, s: Tensor, index: Tensor, neg: Tensor, lat: Lattice) -> Tensor:
    """Values (N, 256) from d (N, 1), codes s (N, nsub), grid indices (N, groups) and signs (N, 256), as
    gguf.quants computes them: (step * grid value) * sign."""
    n = d.shape[0]
    g = lattice_grid(lat.name, d.device).index_select(0, index.reshape(-1).to(torch.int32)).view(n, -1, lat.sub)
    v = (lattice_step(d, s.to(torch.float32), lat).unsqueeze(-1) * g).view(n, QK_K)
    return torch.where(neg, -v, v)


# ---------------------------------------------------------------------------------------------------------
# Byte layouts (ggml-common.h)


def _le_bytes(v: Tensor, count: int) -> Tensor:
    """Integers v (..., k) as `count` little-endian bytes each, (..., k * count)."""
    shifts = 8 * torch.arange(count, dtype=torch.int64, device=v.device)
    return ((v.to(torch.int64).unsqueeze(-1) >> shifts) & 255).to(torch.uint8).flatten(-2)


def _le_int(b: Tensor, count: int) -> Tensor:
    """Inverse of _le_bytes: (..., k * count) bytes -> (..., k) int64."""
    shifts = 8 * torch.arange(count, dtype=torch.int64, device=b.device)
    return (b.reshape(*b.shape[:-1], -1, count).to(torch.int64) << shifts).sum(-1)


def _sign_bytes(neg: Tensor) -> Tensor:
    """(N, 256) bool -> (N, 32) bytes, value j of each 8 in bit j."""
    bits = 1 << torch.arange(8, dtype=torch.int32, device=neg.device)
    return (neg.view(neg.shape[0], -1, 8).to(torch.int32) * bits).sum(-1)


def _sign_bits(b: Tensor) -> Tensor:
    """(N, 32) sign bytes (any integer type) -> (N, 256) bool."""
    bits = 1 << torch.arange(8, dtype=torch.int32, device=b.device)
    return ((b.to(torch.int32).unsqueeze(-1) & bits) != 0).view(b.shape[0], -1)


def _parity_sign_bits(seven: Tensor) -> Tensor:
    """(N, 32) 7-bit sign codes -> (N, 256) bool, through gguf's ksigns table (bit 7 the parity of the seven)."""
    table = torch.frombuffer(bytearray(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8).to(seven.device)
    return _sign_bits(table.index_select(0, seven.reshape(-1).to(torch.int32)).view(seven.shape))


def _nibbles(s: Tensor) -> Tensor:
    """4-bit codes (N, 2k) -> (N, k) bytes, code 2j in the low nibble of byte j."""
    s = s.to(torch.int32).view(s.shape[0], -1, 2)
    return (s[..., 0] | (s[..., 1] << 4)).to(torch.uint8)


def _unnibble(b: Tensor) -> Tensor:
    return torch.stack([b & 15, b >> 4], dim=-1).view(b.shape[0], -1)


def _seven_sign_bits(neg: Tensor) -> Tensor:
    """The 7 low sign bits per 8 values (their count of set bits made even by the encoder)."""
    return _sign_bytes(neg) & 127


def pack_iq2_xxs(d: Tensor, s: Tensor, index: Tensor, neg: Tensor) -> Tensor:
    """IQ2_XXS super-blocks from f16 d (N,), sub-block scale codes s (N, nsub), grid indices (N, groups) and signs
    (N, 256) bool."""
    # Per sub-block of 32: the 4 groups' grid indices, one byte each, then a u32 of their 4 7-bit sign codes
    # (bits 0-27) and the scale (bits 28-31).
    signs = _seven_sign_bits(neg).to(torch.int64).view(-1, 8, 4)
    aux = (signs << (7 * torch.arange(4, device=d.device))).sum(-1) | (s.to(torch.int64) << 28)
    body = torch.cat([index.to(torch.uint8).view(-1, 8, 4), _le_bytes(aux.unsqueeze(-1), 4).view(-1, 8, 4)], -1)
    return torch.cat([f16_bytes(d), body.view(-1, 64)], -1)


def _decode_iq2_xxs(b: Tensor) -> Tensor:
    body = b[:, 2:].reshape(-1, 8, 8)
    aux = _le_int(body[..., 4:], 4).squeeze(-1)  # (N, 8)
    seven = (aux.unsqueeze(-1) >> (7 * torch.arange(4, device=b.device))) & 127
    neg = _parity_sign_bits(seven.view(-1, 32))
    return _decode(read_f16(b[:, :2]), aux >> 28, body[..., :4].reshape(-1, 32), neg, IQ2_XXS)


def pack_iq2_xs(d: Tensor, s: Tensor, index: Tensor, neg: Tensor) -> Tensor:
    """IQ2_XS super-blocks from f16 d (N,), sub-block scale codes s (N, nsub), grid indices (N, groups) and signs
    (N, 256) bool."""
    # Per group of 8: a u16 of its 9-bit grid index and 7-bit sign code; then the 16 4-bit scales.
    qs = index.to(torch.int64) | (_seven_sign_bits(neg).to(torch.int64) << 9)
    return torch.cat([f16_bytes(d), _le_bytes(qs, 2), _nibbles(s)], -1)


def _decode_iq2_xs(b: Tensor) -> Tensor:
    qs = _le_int(b[:, 2:66], 2)
    neg = _parity_sign_bits(qs >> 9)
    return _decode(read_f16(b[:, :2]), _unnibble(b[:, 66:74]), qs & 511, neg, IQ2_XS)


def pack_iq2_s(d: Tensor, s: Tensor, index: Tensor, neg: Tensor) -> Tensor:
    """IQ2_S super-blocks from f16 d (N,), sub-block scale codes s (N, nsub), grid indices (N, groups) and signs
    (N, 256) bool."""
    # The groups' low 8 index bits, their sign bytes, their high 2 index bits (4 groups a byte), the scales.
    index = index.to(torch.int32)
    high = (index >> 8).view(-1, 8, 4) << (2 * torch.arange(4, dtype=torch.int32, device=d.device))
    parts = [f16_bytes(d), index & 255, _sign_bytes(neg), high.sum(-1), _nibbles(s)]
    return torch.cat([p.to(torch.uint8) for p in parts], -1)


def _decode_iq2_s(b: Tensor) -> Tensor:
    high = (b[:, 66:74].to(torch.int32).unsqueeze(-1) >> (2 * torch.arange(4, device=b.device))) & 3
    index = b[:, 2:34].to(torch.int32) | (high.view(-1, 32) << 8)
    return _decode(read_f16(b[:, :2]), _unnibble(b[:, 74:82]), index, _sign_bits(b[:, 34:66]), IQ2_S)


def pack_iq3_xxs(d: Tensor, s: Tensor, index: Tensor, neg: Tensor) -> Tensor:
    """IQ3_XXS super-blocks from f16 d (N,), sub-block scale codes s (N, nsub), grid indices (N, groups) and signs
    (N, 256) bool."""
    # The 64 groups' grid indices, one byte each; then per sub-block a u32 of its 4 7-bit sign codes and scale.
    signs = _seven_sign_bits(neg).to(torch.int64).view(-1, 8, 4)
    aux = (signs << (7 * torch.arange(4, device=d.device))).sum(-1) | (s.to(torch.int64) << 28)
    return torch.cat([f16_bytes(d), index.to(torch.uint8), _le_bytes(aux, 4)], -1)


def _decode_iq3_xxs(b: Tensor) -> Tensor:
    aux = _le_int(b[:, 66:98], 4)
    seven = (aux.unsqueeze(-1) >> (7 * torch.arange(4, device=b.device))) & 127
    neg = _parity_sign_bits(seven.view(-1, 32))
    return _decode(read_f16(b[:, :2]), aux >> 28, b[:, 2:66], neg, IQ3_XXS)


def pack_iq3_s(d: Tensor, s: Tensor, index: Tensor, neg: Tensor) -> Tensor:
    """IQ3_S super-blocks from f16 d (N,), sub-block scale codes s (N, nsub), grid indices (N, groups) and signs
    (N, 256) bool."""
    # The groups' low 8 index bits, their 9th bits (8 groups a byte), the sign bytes, the scales.
    index = index.to(torch.int32)
    high = (index >> 8).view(-1, 8, 8) << torch.arange(8, dtype=torch.int32, device=d.device)
    parts = [f16_bytes(d), index & 255, high.sum(-1), _sign_bytes(neg), _nibbles(s)]
    return torch.cat([p.to(torch.uint8) for p in parts], -1)


def _decode_iq3_s(b: Tensor) -> Tensor:
    high = (b[:, 66:74].to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=b.device)) & 1
    index = b[:, 2:66].to(torch.int32) | (high.view(-1, 64) << 8)
    return _decode(read_f16(b[:, :2]), _unnibble(b[:, 106:110]), index, _sign_bits(b[:, 74:106]), IQ3_S)


# name -> decoder: super-blocks (N, block bytes) -> values (N, 256)
LATTICE_DECODERS: dict[str, Callable[[Tensor], Tensor]] = {
    "IQ3_S": _decode_iq3_s,
    "IQ3_XXS": _decode_iq3_xxs,
    "IQ2_S": _decode_iq2_s,
    "IQ2_XS": _decode_iq2_xs,
    "IQ2_XXS": _decode_iq2_xxs,
}
