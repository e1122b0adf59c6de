"""Every GGUF block type's encoder, built on formats.codecs' packers.

A type with scales has a `Grid`: its importance-weighted scale search (scales), then the codes nearest under
the scales it chose, packed as the type's bytes. Without importance, the legacy and ternary types (Q8_0, Q5_0,
Q5_1, Q4_0, Q4_1, TQ2_0, TQ1_0) run ggml's reference quantizers (quantize_row_*_ref), byte for byte what
gguf.quants.quantize writes, and the K-quants and IQ4_NL/IQ4_XS their grid's search with llama.cpp's default
weights. The lattice types IQ3_S .. IQ2_XXS code groups of values jointly, with no Grid (lattice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from autosquash.compress.quantize.lattice import LATTICE_ENCODERS
from autosquash.compress.quantize.scales import (
    IQ4_CELL_INDEX,
    IQ4_HALF_UNITS,
    affine_k,
    affine_legacy_scales,
    iq4_index,
    iq4_nl_scales,
    iq4_xs_scales,
    k_weights,
    reciprocal,
    signed_max,
    signed_scale,
    symmetric_k,
    symmetric_k_better,
    symmetric_k_codes,
    ternary_scales,
)
from autosquash.formats.codecs import (
    IQ4_VALUES,
    QK_K,
    Scales,
    compiled,
    pack_f16,
    pack_f32,
    pack_iq4_nl,
    pack_iq4_xs,
    pack_q2_k,
    pack_q3_k,
    pack_q4_0,
    pack_q4_1,
    pack_q4_k,
    pack_q5_0,
    pack_q5_1,
    pack_q5_k,
    pack_q6_k,
    pack_q8_0,
    pack_tq1_0,
    pack_tq2_0,
    quantizable_type,
)

Encoder = Callable[[Tensor, "Tensor | None"], Tensor]
Packer = Callable[[Scales, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------------
# Grids: every importance-weighted encoder in two steps, scales then codes, so that error compensation
# (autosquash.compress.gptq) can code a block's values one column at a time against the scales chosen for it.


@dataclass(frozen=True)
class Grid:
    """A GGUF type's weighted quantizer: `scales` chooses the stored scale fields of rows of `block` values,
    `affine` says what each code means under them (value = step * level + offset, one step and offset per
    `sub` values), `pack` lays scales and codes out as the type's bytes."""

    block: int  # values one call of `scales` covers: a block (32) or a K-quant super-block (256)
    sub: int  # values sharing one step and offset
    lo: int  # code range, for grids whose level is the code
    hi: int
    scales: Callable[[Tensor, Tensor | None], Scales]
    affine: Callable[[Scales], tuple[Tensor, Tensor | None]]  # (N, block // sub) each; offset None: 0
    pack: Packer  # (scales, codes (N, block)) -> (N, block bytes)
    nonlinear: bool = False  # codes index ggml's IQ4 levels instead of being the levels
    # On a CPU, in one compiled pass where a type has one: what `fit` returns, and quantize.no_worse_rows of rows
    # (r, cols) under their search weights (r, cols) and importance (cols,).
    compiled_fit: Callable[[Tensor, Tensor | None], tuple[Scales, Tensor]] | None = None
    compiled_no_worse: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def nearest(self, v: Tensor) -> Tensor:
        """The codes nearest values v given in grid units (v is overwritten; for a linear grid, it is them)."""
        return iq4_index(v) if self.nonlinear else v.round_().clamp_(self.lo, self.hi)

    def levels(self, q: Tensor) -> Tensor:
        """The grid values codes q stand for, in grid units."""
        return IQ4_VALUES.to(q.device)[q.long()] if self.nonlinear else q

    def lookup(self) -> tuple[np.ndarray, int, np.ndarray]:
        """`nearest` and `levels` of a non-linear grid as tables: v's code is cells[c], c = 2 v + half
        clamped to [0, 2 half] and truncated, and its level levels[code]; a linear grid's are empty."""
        if not self.nonlinear:
            return np.empty(0, np.uint8), 0, np.empty(0, np.float32)
        return IQ4_CELL_INDEX.numpy(), IQ4_HALF_UNITS, IQ4_VALUES.numpy()

    def codes(self, x: Tensor, step: Tensor, offset: Tensor | None) -> Tensor:
        """Nearest codes of x (N, k * sub) under (step, offset) (N, k): the encoders' exact arithmetic."""
        n = x.shape[0]
        v = x.view(n, step.shape[-1], -1)
        if offset is not None:
            v = v - offset.unsqueeze(-1)
        return self.nearest(v * reciprocal(step).unsqueeze(-1)).view(n, -1)

    def values(self, q: Tensor, step: Tensor, offset: Tensor | None) -> Tensor:
        """The values codes q (N, k * sub) stand for under (step, offset) (N, k)."""
        n = q.shape[0]
        v = self.levels(q).view(n, step.shape[-1], -1) * step.unsqueeze(-1)
        if offset is not None:
            v = v + offset.unsqueeze(-1)
        return v.view(n, -1)

    def fit(self, x: Tensor, w: Tensor | None) -> tuple[Scales, Tensor]:
        """Rows x (N, block): `scales` under weights w, and the codes nearest under them."""
        if self.compiled_fit is not None and compiled(x):
            return self.compiled_fit(x, w)
        s = self.scales(x, w)
        return s, self.codes(x, *self.affine(s))

    def encode(self, x: Tensor, w: Tensor | None) -> Tensor:
        """Rows x (N, block) as the type's bytes: `fit`, packed."""
        return self.pack(*self.fit(x, w))


def _scale_only(s: Scales) -> tuple[Tensor, None]:
    """One scale per block: its step."""
    return s[0].unsqueeze(-1), None


def _scale_and_min(s: Scales) -> tuple[Tensor, Tensor]:
    """Q4_1/Q5_1: one scale and one min per block."""
    return s[0].unsqueeze(-1), s[1].unsqueeze(-1)


def _k_symmetric_affine(s: Scales) -> tuple[Tensor, None]:
    """K-quant step per sub-block: d * sc, as the dequantizer forms it."""
    return s[0].unsqueeze(-1) * s[1], None


def _k_affine_affine(s: Scales) -> tuple[Tensor, Tensor]:
    """Q2_K/Q4_K/Q5_K: step d * sc and offset -(dmin * m) per sub-block."""
    d, dmin, sc, m = s
    return d.unsqueeze(-1) * sc, -(dmin.unsqueeze(-1) * m)


# ---------------------------------------------------------------------------------------------------------
# ggml's reference quantizers (without importance) of the legacy and ternary types


def _round_half_away(v: Tensor) -> Tensor:
    """Round half away from zero exactly as gguf's np_roundf (llama.cpp's roundf), not torch's half-to-even."""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def _symmetric_legacy(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Reference (f16 scale, codes in [-nmax, nmax - 1]) for Q4_0 (nmax 8) and Q5_0 (nmax 16)."""
    # quantize_row_q4_0_ref: the largest-magnitude value maps to -nmax, codes truncated after +nmax+0.5.
    d = signed_max(x) / -nmax
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc(x * inv.unsqueeze(-1) + (nmax + 0.5)).clamp_(0, 2 * nmax - 1)
    return d, q - nmax


def _affine_legacy(x: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reference (f16 scale, f16 min, codes in [0, nmax]) for Q4_1 (nmax 15) and Q5_1 (nmax 31)."""
    # quantize_row_q4_1_ref: min/max range split into nmax steps.
    mn = x.amin(-1)
    d = (x.amax(-1) - mn) / nmax
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc((x - mn.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).clamp_(0, nmax)
    return d, mn, q


def _split(t: tuple[Tensor, ...]) -> tuple[Scales, Tensor]:
    """(scale fields..., codes) -> (scale fields, codes), as the pack functions take them."""
    return t[:-1], t[-1]


def _ternary_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference (scale, codes in {-1, 0, 1}) for TQ1_0/TQ2_0."""
    # quantize_row_tq1_0_ref: d = max|x|, i.e. exact for already-ternary weights (BitNet b1.58).
    d = x.abs().amax(-1)
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    return d, _round_half_away(x * inv.unsqueeze(-1))


# ---------------------------------------------------------------------------------------------------------
# Each type's grid and encoder


def _signed_legacy_grid(lo: int, hi: int, pack: Packer) -> Grid:
    return Grid(32, 32, lo, hi, lambda x, w: (signed_scale(x, w, lo, hi),), _scale_only, pack)


def _affine_legacy_grid(nmax: int, pack: Packer) -> Grid:
    return Grid(32, 32, 0, nmax, lambda x, w: affine_legacy_scales(x, w, nmax), _scale_and_min, pack)


def _k_affine_grid(sub: int, nmax: int, scale_nmax: int, default, pack: Packer) -> Grid:
    def scales(x: Tensor, w: Tensor | None) -> Scales:
        return affine_k(x, k_weights(x, w, sub, default), sub, nmax, scale_nmax)

    return Grid(QK_K, sub, 0, nmax, scales, _k_affine_affine, pack)


def _k_symmetric_grid(nmax: int, scale_nmax: int, pack: Packer) -> Grid:
    def scales(x: Tensor, w: Tensor | None) -> Scales:
        return symmetric_k(x, k_weights(x, w, 16, "square"), nmax, scale_nmax)

    def fit(x: Tensor, w: Tensor | None) -> tuple[Scales, Tensor]:
        return symmetric_k_codes(x, k_weights(x, w, 16, "square"), nmax, scale_nmax)

    def no_worse(x: Tensor, sw: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
        scales, codes, values = symmetric_k_better(x, sw, imp, nmax, scale_nmax)
        return pack(scales, codes).view(x.shape[0], -1), values

    return Grid(
        QK_K, 16, -nmax, nmax - 1, scales, _k_symmetric_affine, pack, compiled_fit=fit, compiled_no_worse=no_worse
    )


# The reference's symmetric -127..127: some int8 dot-product kernels assume -128 never occurs.
_Q8_0 = _signed_legacy_grid(-127, 127, pack_q8_0)


def _encode_q8_0(x: Tensor, w: Tensor | None) -> Tensor:
    if w is not None:
        return _Q8_0.encode(x, w)
    # quantize_row_q8_0_ref: max|x| maps to 127, round half away from zero.
    d = x.abs().amax(-1) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    return pack_q8_0((d,), _round_half_away(x * inv.unsqueeze(-1)))


_Q4_0 = _signed_legacy_grid(-8, 7, pack_q4_0)
_Q4_1 = _affine_legacy_grid(15, pack_q4_1)
_Q5_0 = _signed_legacy_grid(-16, 15, pack_q5_0)
_Q5_1 = _affine_legacy_grid(31, pack_q5_1)


def _encode_q4_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q4_0.encode(x, w) if w is not None else pack_q4_0(*_split(_symmetric_legacy(x, 8)))


def _encode_q4_1(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q4_1.encode(x, w) if w is not None else pack_q4_1(*_split(_affine_legacy(x, 15)))


def _encode_q5_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q5_0.encode(x, w) if w is not None else pack_q5_0(*_split(_symmetric_legacy(x, 16)))


def _encode_q5_1(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q5_1.encode(x, w) if w is not None else pack_q5_1(*_split(_affine_legacy(x, 31)))


_Q2_K = _k_affine_grid(16, 3, 15, "abs", pack_q2_k)
_Q3_K = _k_symmetric_grid(4, 32, pack_q3_k)
_Q4_K = _k_affine_grid(32, 15, 63, "rms+abs", pack_q4_k)
_Q5_K = _k_affine_grid(32, 31, 63, "rms+abs", pack_q5_k)
_Q6_K = _k_symmetric_grid(32, 128, pack_q6_k)
_TQ2_0 = Grid(QK_K, QK_K, -1, 1, ternary_scales, _scale_only, pack_tq2_0)
_TQ1_0 = Grid(QK_K, QK_K, -1, 1, ternary_scales, _scale_only, pack_tq1_0)
_IQ4_NL = Grid(32, 32, 0, 15, iq4_nl_scales, _scale_only, pack_iq4_nl, nonlinear=True)
_IQ4_XS = Grid(QK_K, 32, 0, 15, iq4_xs_scales, _k_symmetric_affine, pack_iq4_xs, nonlinear=True)


def _encode_tq2_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _TQ2_0.encode(x, w) if w is not None else pack_tq2_0(*_split(_ternary_reference(x)))


def _encode_tq1_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _TQ1_0.encode(x, w) if w is not None else pack_tq1_0(*_split(_ternary_reference(x)))


def _float_encoder(pack: Callable[[Tensor], Tensor]) -> Encoder:
    """F32/F16: no scales, so nothing for importance to weigh; the values as the type stores them."""
    return lambda x, w: pack(x)


# ---------------------------------------------------------------------------------------------------------
# Tables

# Every type of formats.codecs.QUANTIZABLE_TYPES: super-blocks or blocks (N, block) and their search weights (or
# None) -> bytes (N, block bytes).
ENCODERS: dict[str, Encoder] = {
    "F32": _float_encoder(pack_f32),
    "F16": _float_encoder(pack_f16),
    "Q8_0": _encode_q8_0,
    "Q6_K": _Q6_K.encode,
    "Q5_1": _encode_q5_1,
    "Q5_K": _Q5_K.encode,
    "Q5_0": _encode_q5_0,
    "Q4_1": _encode_q4_1,
    "Q4_K": _Q4_K.encode,
    "Q4_0": _encode_q4_0,
    "Q3_K": _Q3_K.encode,
    "Q2_K": _Q2_K.encode,
    "TQ2_0": _encode_tq2_0,
    "TQ1_0": _encode_tq1_0,
    "IQ4_NL": _IQ4_NL.encode,
    "IQ4_XS": _IQ4_XS.encode,
    **LATTICE_ENCODERS,  # IQ3_S .. IQ2_XXS: codes chosen group by group, so no Grid
}

# The importance-weighted quantizer of every block type, in two steps (what `quantize` runs with importance).
GRIDS: dict[str, Grid] = {
    "Q8_0": _Q8_0,
    "Q6_K": _Q6_K,
    "Q5_1": _Q5_1,
    "Q5_K": _Q5_K,
    "Q5_0": _Q5_0,
    "Q4_1": _Q4_1,
    "Q4_K": _Q4_K,
    "Q4_0": _Q4_0,
    "Q3_K": _Q3_K,
    "Q2_K": _Q2_K,
    "TQ2_0": _TQ2_0,
    "TQ1_0": _TQ1_0,
    "IQ4_NL": _IQ4_NL,
    "IQ4_XS": _IQ4_XS,
}


def grid(type_name: str) -> Grid | None:
    """The two-step weighted quantizer of a block type (None for F32/F16, which have no scales, and for the lattice
    types)."""
    return GRIDS.get(quantizable_type(type_name))
