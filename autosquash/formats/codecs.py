"""Quantization of weight matrices to GGUF tensor types, producing exactly the bytes a GGUF file holds.

Block layouts are ggml's (ggml-common.h), the ones `gguf.quants` reads back. Without `importance`, the
legacy and ternary types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, TQ2_0, TQ1_0) reproduce llama.cpp's reference
quantizers byte for byte (what `gguf.quants.quantize` writes), and the K-quants run a least-squares
scale/min search with llama.cpp's default weights (ideas of make_qx_quants / make_qkx2_quants in
ggml-quants.c). With `importance` (per input channel, e.g. the mean squared activation) every quantized
type searches its scales for the lowest importance-weighted squared error, as llama.cpp does with an
imatrix. The non-linear IQ4_NL/IQ4_XS (gguf.quants reads them but writes neither) search their scales the
same way over ggml's 16-level grid, weighting by x^2 without importance as llama.cpp's quantize_iq4_nl does.
Everything is vectorized over blocks in torch; rows go through in cache-sized chunks. On a CPU the affine
search of the K-quants runs compiled (cpu_kernels), a sub-block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from autosquash.errors import AutosquashError
from autosquash.formats.cpu_kernels import decode_k_affine, decode_q6_k, fit_affine, fit_scale
from autosquash.formats.gguf_types import tensor_type
from autosquash.formats.iq_lattice import LATTICE_CODECS, lattice_weights

QK_K = 256  # values per K-quant / ternary super-block
# Values quantized per step: big enough to amortize the ~500 small torch calls per step, small enough that
# the search's temporaries stay in cache (measured on 2 cores: 2^17 is 2-3x faster than 2^13 or 2^20).
# On a GPU each call is a kernel launch and there is no cache to stay in: steps as big as memory allows.
_CHUNK_VALUES = 1 << 17
_CHUNK_VALUES_GPU = 1 << 22  # ~0.2 GB per candidate-sized temporary
# Candidate 1/scale offsets around the max-magnitude mapping: llama.cpp's make_qx_quants range (+-0.9) at
# step 0.3 instead of 0.1; with the refit rounds below the errors on Gaussian rows agree to 1e-4.
_SCALE_OFFSETS = 0.3 * torch.arange(-3, 4, dtype=torch.float32)
# Candidate offsets for the affine (scale + min) search: make_qkx2_quants' Q4_K range (rmin -1 .. +1), step 0.2.
_AFFINE_OFFSETS = -1.0 + 0.2 * torch.arange(11, dtype=torch.float32)
# Ternary 1/scale candidates as multiples of 1/max|x|: zero threshold from 0.83 to 0.13 of max|x|.
_TERNARY_MULTIPLES = 0.6 + 0.4 * torch.arange(9, dtype=torch.float32)
# Assign-then-refit rounds after the candidate scan (each can only lower the error).
_REFINE_STEPS = 2
# The affine fit's codes count as all equal (a constant block) below this spread, relative to their size.
_DET_EPS = 1e-10
# The scale searches and the Q4_K/Q6_K decoders on a CPU: compiled (cpu_kernels), or torch's ops as on a GPU
# (tests compare the two).
COMPILED_CPU = True

Encoder = Callable[[Tensor, "Tensor | None"], Tensor]
Decoder = Callable[[Tensor], Tensor]


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
# Small helpers: f16 scales, bit packing, rounding


def _f16(v: Tensor) -> Tensor:
    """`v` rounded to the f16 a block stores (as float32, so codes are chosen against the stored scale)."""
    return v.to(torch.float16).to(torch.float32)


def _f16_bytes(v: Tensor) -> Tensor:
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _read_f16(b: Tensor) -> Tensor:
    """(N, 2) bytes -> (N, 1) float32, like numpy's `.view(np.float16).astype(np.float32)`."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _pack(q: Tensor, bits: int) -> Tensor:
    """OR q[..., i, :] << (i * bits) over axis -2: how ggml stacks strided sub-rows of a block into bytes."""
    out = torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=torch.uint8, device=q.device)
    for i in range(q.shape[-2]):
        out |= q[..., i, :].to(torch.uint8) << (i * bits)
    return out


def _unpack(b: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of _pack: (..., L) bytes -> (..., count, L) codes of `bits` bits each."""
    shifts = torch.arange(0, count * bits, bits, dtype=torch.uint8, device=b.device).reshape(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _round_half_away(v: Tensor) -> Tensor:
    """Round half away from zero exactly as gguf's np_roundf (llama.cpp's roundf), not torch's half-to-even."""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def _signed_max(x: Tensor) -> Tensor:
    """The value of largest magnitude along the last axis, sign kept (first one on ties, as numpy)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def reciprocal(scale: Tensor) -> Tensor:
    """1 / scale, 0 where scale is 0 (an all-zero block: x * 0 then maps to the grid's code for 0)."""
    # Multiplying by a masked reciprocal keeps every full-size op a plain multiply (a full-size
    # torch.where costs ~4x as much on CPU).
    return torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)


def _codes(x: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
    """Nearest grid codes clamp(round(x / scale), lo, hi), `scale` broadcast against x; 0 where it is 0."""
    return (x * reciprocal(scale)).round_().clamp_(lo, hi)


def _candidates(ref: Tensor, numerators: Tensor) -> Tensor:
    """Candidate 1/scale values numerators / ref, shape (C, *ref.shape); 0 where ref is 0 (an all-zero row)."""
    nonzero = ref != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, ref, 1.0), 0.0)
    return numerators.to(ref.device).reshape(-1, *[1] * ref.ndim) * inv


# ---------------------------------------------------------------------------------------------------------
# Scale searches (llama.cpp ggml-quants.c: make_qx_quants, make_qkx2_quants, make_qp_quants ideas).
# They take rows of values (rows, n) but work on the transpose with all candidates at once, (n, C, rows):
# sums over the short value axis become vector adds and per-row scalars broadcast contiguously, about
# 2x faster on CPU than reducing an innermost axis of 16 or 32 values, one candidate at a time.


def _columns(x: Tensor) -> Tensor:
    """(rows, n) -> (n, 1, rows): values along axis 0, room for a candidate axis in the middle."""
    return x.T.contiguous().unsqueeze(1)


def _lsq_scale(x: Tensor, w: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted least-squares scale for fixed codes, and its error reduction sum(wxq)^2 / sum(wq^2)."""
    wq = w * q
    sum_xq = (wq * x).sum(0)
    sum_qq = wq.mul_(q).sum(0)
    ok = sum_qq > 0
    scale = torch.where(ok, sum_xq / torch.where(ok, sum_qq, 1.0), 0.0)
    return scale, scale * sum_xq


# What a row's scale candidates are relative to (cpu_kernels._reference takes their positions).
_REFERENCES: tuple[Callable[[Tensor], Tensor], ...] = (_signed_max, lambda x: x.amax(-1), lambda x: x.abs().amax(-1))
_SIGNED_MAX, _MAX, _ABS_MAX = range(3)


def _fit_scale(x: Tensor, w: Tensor, lo: int, hi: int, numerators: Tensor, reference: int) -> Tensor:
    """Per-row scale s minimising sum w (x - s q)^2 with integer codes q in [lo, hi] (symmetric grids), the
    candidates 1/s `_candidates` of the row's `_REFERENCES[reference]`; on a CPU compiled (cpu_kernels.fit_scale,
    as `_fit_affine`, the candidates worked out there)."""
    if compiled(x):
        out = np.empty(x.shape[0], np.float32)
        fit_scale(_numpy32(x), _numpy32(w), lo, hi, _numpy32(numerators), reference, _REFINE_STEPS, out)
        return torch.from_numpy(out)
    iscales = _candidates(_REFERENCES[reference](x), numerators)
    return _fit_grid_scale(x, w, lambda v: v.round_().clamp_(lo, hi), iscales)


def _fit_grid_scale(x: Tensor, w: Tensor, snap: Callable[[Tensor], Tensor], iscales: Tensor) -> Tensor:
    """Per-row scale s minimising sum w (x - s g)^2 over grid values g; snap(v) is the grid value nearest v
    (it may work in place).

    Each candidate 1/s (iscales, shape (C, rows)) gives grid values, refit by least squares; the best is then
    refined by assign/refit rounds, each of which can only lower the error.
    """
    x, w = _columns(x), _columns(w)
    scale, gain = _lsq_scale(x, w, snap(x * iscales))
    best_gain, pick = gain.max(0, keepdim=True)
    best = scale.gather(0, pick)
    for _ in range(_REFINE_STEPS):
        scale, gain = _lsq_scale(x, w, snap(x * reciprocal(best)))
        better = gain > best_gain
        best, best_gain = torch.where(better, scale, best), torch.where(better, gain, best_gain)
    return best.squeeze(0)


def _signed_scale(v: Tensor, w: Tensor, lo: int, hi: int) -> Tensor:
    """Per-row f16 scale d for codes in [lo, hi] (lo < 0) with v ~ d * codes, weighted search.

    Candidates map the largest-magnitude value to about lo: on the grids with an extra negative level
    (Q4_0's -8..7) that level is then used for the largest value, as llama.cpp does.
    """
    return _f16(_fit_scale(v, w, lo, hi, lo - _SCALE_OFFSETS, _SIGNED_MAX))


def _quantize_signed(v: Tensor, w: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """`_signed_scale` and the codes in [lo, hi] against it."""
    d = _signed_scale(v, w, lo, hi)
    return d, _codes(v, d.unsqueeze(-1), lo, hi)


def _quantize_nonneg(v: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Per-row f16 scale d and codes in [0, nmax] for non-negative v (K-quant sub-block scales and mins)."""
    d = _f16(_fit_scale(v, w, 0, nmax, nmax + _SCALE_OFFSETS, _MAX))
    return d, _codes(v, d.unsqueeze(-1), 0, nmax)


def _lsq_affine(
    x: Tensor, w: Tensor, q: Tensor, sums: tuple[Tensor, Tensor, Tensor], min_le_zero: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted least-squares (scale, min) for x ~ scale * q + min with fixed codes, and its error.

    `sums` are (sum w, the weighted mean of x, sum w (x - mean)^2), and `x` comes centred on that mean. The
    codes are centred too, so no sum cancels: a block where one value's weight is a million times the others'
    (an input channel with massive activations) still gets the others' fit, not a rounding-noise one.
    """
    sw, _, sxx = sums
    wq = w * q
    qbar = wq.sum(0) / sw.clamp_min(1e-30)
    qc = q - qbar
    wqc = w * qc
    sqq = (wqc * qc).sum(0)  # sum w (q - qbar)^2: 0 only when every code is equal
    sxq = (wqc * x).sum(0)
    ok = sqq > _DET_EPS * sw * qbar.square().clamp_min(1.0)
    scale = torch.where(ok, sxq / torch.where(ok, sqq, 1.0), 0.0)
    mn = sums[1] - scale * qbar
    err = sxx - scale * sxq  # the residual of the fit, in closed form
    if min_le_zero:
        # K-quants store -min with one non-negative dmin per super-block, so a positive min becomes 0: then
        # x ~ scale * q alone (sums about zero, from the centred ones).
        pos = mn > 0
        raw_qq = sqq + sw * qbar.square()
        raw_xq = sxq + sw * sums[1] * qbar
        s0 = torch.where(raw_qq > 0, raw_xq / raw_qq.clamp_min(1e-30), 0.0)
        raw_err = sxx + sw * sums[1].square() - s0 * raw_xq
        scale, mn, err = torch.where(pos, s0, scale), torch.where(pos, 0.0, mn), torch.where(pos, raw_err, err)
    return scale, mn, err


def _fit_affine(x: Tensor, w: Tensor, nmax: int, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    """Per-row (scale, min) minimising sum w (x - scale q - min)^2, codes q in [0, nmax] (make_qkx2_quants).

    On a CPU the compiled search of autosquash.formats.cpu_kernels runs it, a sub-block at a time (the same
    arithmetic); elsewhere, or with `COMPILED_CPU` off, the torch ops below, all candidates at once."""
    if compiled(x):
        return _fit_affine_compiled(x, w, nmax, min_le_zero)
    x, w = _columns(x), _columns(w)
    sw = w.sum(0)
    xbar = (w * x).sum(0) / sw.clamp_min(1e-30)  # an all-zero row weighs nothing: its mean is 0
    xc = x - xbar
    sums = (sw, xbar, (w * xc * xc).sum(0))
    xmin = x.amin(0)
    if min_le_zero:
        xmin = xmin.clamp(max=0.0)
    iscales = _candidates((x.amax(0) - xmin).squeeze(0), nmax + _AFFINE_OFFSETS)
    scale, mn, err = _lsq_affine(xc, w, ((x - xmin) * iscales).round_().clamp_(0, nmax), sums, min_le_zero)
    best_err, pick = err.min(0, keepdim=True)
    best_s, best_m = scale.gather(0, pick), mn.gather(0, pick)
    for _ in range(_REFINE_STEPS):
        scale, mn, err = _lsq_affine(xc, w, _codes(x - best_m, best_s, 0, nmax), sums, min_le_zero)
        better = err < best_err
        best_s, best_m = torch.where(better, scale, best_s), torch.where(better, mn, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s.squeeze(0), best_m.squeeze(0)


def compiled(t: Tensor) -> bool:
    """Whether work on `t` runs the compiled CPU kernels (cpu_kernels) rather than torch's ops."""
    return t.device.type == "cpu" and COMPILED_CPU


def _numpy32(t: Tensor) -> np.ndarray:
    """A CPU tensor as a C-contiguous float32 array (no copy when it is one already)."""
    return t.detach().to(torch.float32).contiguous().numpy()


def _fit_affine_compiled(x: Tensor, w: Tensor, nmax: int, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    scale, mn = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
    numerators = (nmax + _AFFINE_OFFSETS).numpy()
    fit_affine(_numpy32(x), _numpy32(w), nmax, min_le_zero, numerators, _REFINE_STEPS, np.float32(_DET_EPS), scale, mn)
    return torch.from_numpy(scale), torch.from_numpy(mn)


# ---------------------------------------------------------------------------------------------------------
# Grids: every importance-weighted encoder in two steps, scales then codes, so that error compensation
# (autosquash.compress.gptq) can code a block's values one column at a time against the scales chosen for it.

Scales = tuple[Tensor, ...]


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
    pack: Callable[[Scales, Tensor], Tensor]  # (scales, codes (N, block)) -> (N, block bytes)
    nonlinear: bool = False  # codes index ggml's IQ4 levels instead of being the levels

    def nearest(self, v: Tensor) -> Tensor:
        """The codes nearest values v given in grid units (v is overwritten; for a linear grid, it is them)."""
        return _iq4_index(v) if self.nonlinear else v.round_().clamp_(self.lo, self.hi)

    def levels(self, q: Tensor) -> Tensor:
        """The grid values codes q stand for, in grid units."""
        return _IQ4_VALUES.to(q.device)[q.long()] if self.nonlinear else q

    def lookup(self) -> tuple[np.ndarray, int, np.ndarray]:
        """`nearest` and `levels` of a non-linear grid as tables: v's code is cells[c], c = 2 v + half
        clamped to [0, 2 half] and truncated, and its level levels[code]; a linear grid's are empty."""
        if not self.nonlinear:
            return np.empty(0, np.uint8), 0, np.empty(0, np.float32)
        return _IQ4_CELL_INDEX.numpy(), _IQ4_HALF_UNITS, _IQ4_VALUES.numpy()

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

    def encode(self, x: Tensor, w: Tensor | None) -> Tensor:
        s = self.scales(x, w)
        return self.pack(s, self.codes(x, *self.affine(s)))


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
# Legacy types: 32 values per block (block_q8_0, block_q5_0, block_q5_1, block_q4_0, block_q4_1)


def _symmetric_legacy(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Reference (f16 scale, codes in [-nmax, nmax - 1]) for Q4_0 (nmax 8) and Q5_0 (nmax 16)."""
    # quantize_row_q4_0_ref: the largest-magnitude value maps to -nmax, codes truncated after +nmax+0.5.
    d = _signed_max(x) / -nmax
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


def _signed_legacy_grid(lo: int, hi: int, pack: Callable[[Scales, Tensor], Tensor]) -> Grid:
    return Grid(32, 32, lo, hi, lambda x, w: (_signed_scale(x, w, lo, hi),), _scale_only, pack)


def _affine_legacy_scales(x: Tensor, w: Tensor, nmax: int) -> Scales:
    scale, mn = _fit_affine(x, w, nmax, min_le_zero=False)
    return _f16(scale), _f16(mn)


def _affine_legacy_grid(nmax: int, pack: Callable[[Scales, Tensor], Tensor]) -> Grid:
    return Grid(32, 32, 0, nmax, lambda x, w: _affine_legacy_scales(x, w, nmax), _scale_and_min, pack)


def _pack_q8_0(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), q.to(torch.int8).view(torch.uint8)], dim=-1)


# The reference's symmetric -127..127: some int8 dot-product kernels assume -128 never occurs.
_Q8_0 = _signed_legacy_grid(-127, 127, _pack_q8_0)


def _encode_q8_0(x: Tensor, w: Tensor | None) -> Tensor:
    if w is not None:
        return _Q8_0.encode(x, w)
    # quantize_row_q8_0_ref: max|x| maps to 127, round half away from zero.
    d = x.abs().amax(-1) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    return _pack_q8_0((d,), _round_half_away(x * inv.unsqueeze(-1)))


def _decode_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _read_f16(b[:, :2])


def _pack_q4_0(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), _pack((q + 8).view(-1, 2, 16), 4)], dim=-1)


_Q4_0 = _signed_legacy_grid(-8, 7, _pack_q4_0)


def _encode_q4_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q4_0.encode(x, w) if w is not None else _pack_q4_0(*_split(_symmetric_legacy(x, 8)))


def _decode_q4_0(b: Tensor) -> Tensor:
    q = _unpack(b[:, 2:], 4, 2).reshape(-1, 32).to(torch.int8) - 8
    return _read_f16(b[:, :2]) * q.to(torch.float32)


def _pack_q4_1(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), _f16_bytes(s[1]), _pack(q.view(-1, 2, 16), 4)], dim=-1)


_Q4_1 = _affine_legacy_grid(15, _pack_q4_1)


def _encode_q4_1(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q4_1.encode(x, w) if w is not None else _pack_q4_1(*_split(_affine_legacy(x, 15)))


def _decode_q4_1(b: Tensor) -> Tensor:
    q = _unpack(b[:, 4:], 4, 2).reshape(-1, 32).to(torch.float32)
    return _read_f16(b[:, :2]) * q + _read_f16(b[:, 2:4])


def _pack_q5(q: Tensor) -> tuple[Tensor, Tensor]:
    """(qh, qs) of block_q5_x: bit i of the little-endian uint32 qh is bit 4 of value i; low nibbles as Q4."""
    qh = _pack((q.to(torch.uint8) >> 4).view(-1, 4, 8).transpose(-1, -2), 1)
    return qh, _pack((q.to(torch.uint8) & 15).view(-1, 2, 16), 4)


def _unpack_q5(qh: Tensor, qs: Tensor) -> Tensor:
    high = _unpack(qh, 1, 8).transpose(-1, -2).reshape(-1, 32)
    return _unpack(qs, 4, 2).reshape(-1, 32) | (high << 4)


def _pack_q5_0(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), *_pack_q5(q + 16)], dim=-1)


_Q5_0 = _signed_legacy_grid(-16, 15, _pack_q5_0)


def _encode_q5_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q5_0.encode(x, w) if w is not None else _pack_q5_0(*_split(_symmetric_legacy(x, 16)))


def _decode_q5_0(b: Tensor) -> Tensor:
    q = _unpack_q5(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16
    return _read_f16(b[:, :2]) * q.to(torch.float32)


def _pack_q5_1(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), _f16_bytes(s[1]), *_pack_q5(q)], dim=-1)


_Q5_1 = _affine_legacy_grid(31, _pack_q5_1)


def _encode_q5_1(x: Tensor, w: Tensor | None) -> Tensor:
    return _Q5_1.encode(x, w) if w is not None else _pack_q5_1(*_split(_affine_legacy(x, 31)))


def _decode_q5_1(b: Tensor) -> Tensor:
    q = _unpack_q5(b[:, 4:8], b[:, 8:]).to(torch.float32)
    return _read_f16(b[:, :2]) * q + _read_f16(b[:, 2:4])


# ---------------------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 (block_q2_K .. block_q6_K)


def _k_weights(x: Tensor, w: Tensor | None, sub: int, default: Literal["rms+abs", "abs", "square"]) -> Tensor:
    """Per-value search weights: the importance weights if given, else llama.cpp's *_ref defaults."""
    if w is not None:
        return w
    if default == "rms+abs":  # quantize_row_q4_K_ref / q5_K: av_x + |x| per sub-block
        xs = x.view(x.shape[0], -1, sub)
        return (xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()).view_as(x)
    if default == "abs":  # quantize_row_q2_K_ref
        return x.abs()
    return x.square()  # make_qx_quants rmse_type 1 / make_q3_quants (Q3_K, Q6_K)


def _affine_k(x: Tensor, w: Tensor, sub: int, nmax: int, scale_nmax: int) -> Scales:
    """Q2_K/Q4_K/Q5_K: value = d * sc * q - dmin * m, with per-sub-block codes sc, m and f16 d, dmin.

    Returns (d, dmin, sc, m); sc and m in [0, scale_nmax], for codes q in [0, nmax].
    """
    n = x.shape[0]
    xs, ws = x.view(n, -1, sub), w.view(n, -1, sub)
    scale, mn = _fit_affine(xs.reshape(-1, sub), ws.reshape(-1, sub), nmax, min_le_zero=True)
    scale, mn = scale.clamp(min=0.0).view(n, -1), mn.view(n, -1)
    q = _codes(xs - mn.unsqueeze(-1), scale.unsqueeze(-1), 0, nmax)
    # To first order, a sub-block's scale error costs sum(w q^2) and its min error sum(w) in the values.
    d, sc = _quantize_nonneg(scale, (ws * q * q).sum(-1), scale_nmax)
    dmin, m = _quantize_nonneg(-mn, ws.sum(-1), scale_nmax)
    return d, dmin, sc, m


def _symmetric_k(x: Tensor, w: Tensor, nmax: int, scale_nmax: int) -> Scales:
    """Q3_K/Q6_K: value = d * sc * q over sub-blocks of 16; (d, sc) with sc in [-scale_nmax, scale_nmax-1], for
    codes q in [-nmax, nmax-1]."""
    n = x.shape[0]
    xs, ws = x.view(n, -1, 16), w.view(n, -1, 16)
    flat = xs.reshape(-1, 16)
    scale = _fit_scale(flat, ws.reshape(-1, 16), -nmax, nmax - 1, -nmax - _SCALE_OFFSETS, _SIGNED_MAX).view(n, -1)
    q = _codes(xs, scale.unsqueeze(-1), -nmax, nmax - 1)
    return _quantize_signed(scale, (ws * q * q).sum(-1), -scale_nmax, scale_nmax - 1)


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


def _k_affine_grid(sub: int, nmax: int, scale_nmax: int, default, pack: Callable[[Scales, Tensor], Tensor]) -> Grid:
    def scales(x: Tensor, w: Tensor | None) -> Scales:
        return _affine_k(x, _k_weights(x, w, sub, default), sub, nmax, scale_nmax)

    return Grid(QK_K, sub, 0, nmax, scales, _k_affine_affine, pack)


def _k_symmetric_grid(nmax: int, scale_nmax: int, pack: Callable[[Scales, Tensor], Tensor]) -> Grid:
    def scales(x: Tensor, w: Tensor | None) -> Scales:
        return _symmetric_k(x, _k_weights(x, w, 16, "square"), nmax, scale_nmax)

    return Grid(QK_K, 16, -nmax, nmax - 1, scales, _k_symmetric_affine, pack)


def _pack_q2_k(s: Scales, q: Tensor) -> Tensor:
    d, dmin, sc, m = s
    scales = sc.to(torch.uint8) | (m.to(torch.uint8) << 4)
    qs = _pack(q.view(-1, 2, 4, 32), 2).view(-1, 64)
    return torch.cat([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], dim=-1)


_Q2_K = _k_affine_grid(16, 3, 15, "abs", _pack_q2_k)


def _compiled_decode(b: Tensor, kernel: Callable, f16_at: tuple[int, ...], *args: int) -> Tensor:
    """b's super-blocks decoded by a compiled kernel (cpu_kernels.decode_*): the kernel takes the bytes, the
    f16 fields starting at the byte offsets `f16_at` (d, or d and dmin) as float32, `args`, then its output."""
    out = torch.empty(b.shape[0], QK_K, device=b.device)
    scales = [_numpy32(_read_f16(b[:, a : a + 2])).ravel() for a in f16_at]
    kernel(b.contiguous().numpy(), *scales, *args, out.numpy())
    return out


def _decode_q2_k(b: Tensor) -> Tensor:
    scales = b[:, :16]
    q = _unpack(b[:, 16:80].reshape(-1, 2, 32), 2, 4).reshape(-1, 16, 16).to(torch.float32)
    dl = _read_f16(b[:, 80:82]) * (scales & 15).to(torch.float32)
    ml = _read_f16(b[:, 82:84]) * (scales >> 4).to(torch.float32)
    return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(-1, QK_K)


def _pack_q3_k(s: Scales, q: Tensor) -> Tensor:
    d, sc = s
    q = (q + 4).to(torch.uint8)  # bit 2 goes to hmask (set means no -4 offset), bits 0-1 to qs
    hmask = _pack((q >> 2).view(-1, 8, 32), 1)
    qs = _pack((q & 3).view(-1, 2, 4, 32), 2).view(-1, 64)
    s = (sc + 32).to(torch.uint8)
    scales = torch.cat([_pack((s & 15).view(-1, 2, 8), 4), _pack((s >> 4).view(-1, 4, 4), 2)], dim=-1)
    return torch.cat([hmask, qs, scales, _f16_bytes(d)], dim=-1)


_Q3_K = _k_symmetric_grid(4, 32, _pack_q3_k)


def _decode_q3_k(b: Tensor) -> Tensor:
    high = _unpack(b[:, :32], 1, 8).reshape(-1, 16, 16)
    low = _unpack(b[:, 32:96].reshape(-1, 2, 32), 2, 4).reshape(-1, 16, 16)
    s = _unpack(b[:, 96:104], 4, 2).reshape(-1, 16) | (_unpack(b[:, 104:108], 2, 4).reshape(-1, 16) << 4)
    dl = _read_f16(b[:, 108:110]) * (s.to(torch.int8) - 32).to(torch.float32)
    q = (low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)).to(torch.float32)
    return (dl.unsqueeze(-1) * q).reshape(-1, QK_K)


def _pack_q4_k(s: Scales, q: Tensor) -> Tensor:
    d, dmin, sc, m = s
    qs = _pack(q.view(-1, 4, 2, 32), 4).view(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qs], dim=-1)


_Q4_K = _k_affine_grid(32, 15, 63, "rms+abs", _pack_q4_k)


def _decode_k_affine(b: Tensor, q: Tensor) -> Tensor:
    """Q4_K/Q5_K: (d * sc) * q - (dmin * m) per sub-block of 32, codes q (N, 8, 32) already unpacked."""
    sc, m = _unpack_k_scales(b[:, 4:16])
    scale = _read_f16(b[:, :2]) * sc.to(torch.float32)
    mn = _read_f16(b[:, 2:4]) * m.to(torch.float32)
    return (scale.unsqueeze(-1) * q.to(torch.float32) - mn.unsqueeze(-1)).reshape(-1, QK_K)


def _decode_q4_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, decode_k_affine, (0, 2), 16, -1)
    return _decode_k_affine(b, _unpack(b[:, 16:].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32))


def _pack_q5_k(s: Scales, q: Tensor) -> Tensor:
    d, dmin, sc, m = s
    q = q.to(torch.uint8)
    qh = _pack((q >> 4).view(-1, 8, 32), 1)
    qs = _pack((q & 15).view(-1, 4, 2, 32), 4).view(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, m), qh, qs], dim=-1)


_Q5_K = _k_affine_grid(32, 31, 63, "rms+abs", _pack_q5_k)


def _decode_q5_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, decode_k_affine, (0, 2), 48, 16)
    high = _unpack(b[:, 16:48], 1, 8)
    low = _unpack(b[:, 48:].reshape(-1, 4, 32), 4, 2).reshape(-1, 8, 32)
    return _decode_k_affine(b, low | (high << 4))


def _pack_q6_k(s: Scales, q: Tensor) -> Tensor:
    d, sc = s
    q = (q + 32).to(torch.uint8)
    ql = _pack((q & 15).view(-1, 2, 2, 64), 4).view(-1, 128)
    qh = _pack((q >> 4).view(-1, 2, 4, 32), 2).view(-1, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=-1)


_Q6_K = _k_symmetric_grid(32, 128, _pack_q6_k)


def _decode_q6_k(b: Tensor) -> Tensor:
    if compiled(b):
        return _compiled_decode(b, decode_q6_k, (208,))
    low = _unpack(b[:, :128].reshape(-1, 2, 64), 4, 2).reshape(-1, QK_K)
    high = _unpack(b[:, 128:192].reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K)
    q = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32).view(-1, 16, 16)
    scale = _read_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return (scale.unsqueeze(-1) * q).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Ternary types: super-blocks of 256, values d * {-1, 0, 1} (block_tq1_0, block_tq2_0)


def _ternary_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference (scale, codes in {-1, 0, 1}) for TQ1_0/TQ2_0."""
    # quantize_row_tq1_0_ref: d = max|x|, i.e. exact for already-ternary weights (BitNet b1.58).
    d = x.abs().amax(-1)
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    return d, _round_half_away(x * inv.unsqueeze(-1))


def _ternary_scales(x: Tensor, w: Tensor) -> Scales:
    return (_f16(_fit_scale(x, w, -1, 1, _TERNARY_MULTIPLES, _ABS_MAX)),)


def _pack_tq2_0(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_pack((q + 1).view(-1, 2, 4, 32), 2).view(-1, 64), _f16_bytes(s[0])], dim=-1)


_TQ2_0 = Grid(QK_K, QK_K, -1, 1, _ternary_scales, _scale_only, _pack_tq2_0)


def _encode_tq2_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _TQ2_0.encode(x, w) if w is not None else _pack_tq2_0(*_split(_ternary_reference(x)))


def _decode_tq2_0(b: Tensor) -> Tensor:
    q = _unpack(b[:, :64].reshape(-1, 2, 32), 2, 4).reshape(-1, QK_K).to(torch.int8) - 1
    return _read_f16(b[:, 64:66]) * q.to(torch.float32)


# TQ1_0 packs 5 trits per byte as a base-3 fixed-point fraction: byte = ceil(sum t_k 3^(4-k) * 256 / 243),
# so multiplying the byte by 3^k (mod 256) brings trit k to the top, where (b * 3) >> 8 reads it.
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def _pack_tq1_0(s: Scales, q: Tensor) -> Tensor:
    d = s[0]
    q = (q + 1).to(torch.int32)
    place = _POW3.to(q.device).flip(0).reshape(5, 1)
    qs0 = (q[:, :160].view(-1, 5, 32) * place).sum(1)
    qs1 = (q[:, 160:240].view(-1, 5, 16) * place).sum(1)
    qh = (q[:, 240:].view(-1, 4, 4) * place[:4]).sum(1)
    packed = (torch.cat([qs0, qs1, qh], dim=-1) * 256 + 242) // 243
    return torch.cat([packed.to(torch.uint8), _f16_bytes(d)], dim=-1)


_TQ1_0 = Grid(QK_K, QK_K, -1, 1, _ternary_scales, _scale_only, _pack_tq1_0)


def _encode_tq1_0(x: Tensor, w: Tensor | None) -> Tensor:
    return _TQ1_0.encode(x, w) if w is not None else _pack_tq1_0(*_split(_ternary_reference(x)))


def _decode_tq1_0(b: Tensor) -> Tensor:
    def trits(bytes_: Tensor, count: int) -> Tensor:
        top = (bytes_.to(torch.int32).unsqueeze(-2) * _POW3[:count].to(b.device).reshape(count, 1)) & 255
        return ((top * 3) >> 8).reshape(bytes_.shape[0], -1)

    q = torch.cat([trits(b[:, :32], 5), trits(b[:, 32:48], 5), trits(b[:, 48:52], 4)], dim=-1) - 1
    return _read_f16(b[:, 52:54]) * q.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Non-linear 4-bit types: value = scale * kvalues_iq4nl[q] (block_iq4_nl: blocks of 32; block_iq4_xs:
# super-blocks of 256 whose 8 sub-blocks of 32 share an f16 d through 6-bit scales)

# ggml's kvalues_iq4nl: 16 levels, denser near 0, one more on the negative side (as Q4_0's -8..7).
_IQ4_VALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.0])
_IQ4_MIDPOINTS = (_IQ4_VALUES[1:] + _IQ4_VALUES[:-1]) / 2
# Candidate 1/scale values (grid units over the block's signed largest value): that value mapped near the
# grid's longer end, -127 (ggml's only choice; a negative scale for a positive value), and near its other
# end, +113, since the grid is not symmetric, each from 9 % inside the end level to 14 % beyond it
# (clipped); and onto the next levels in, -104 and +89, where a refit often leaves it (so blocks already on
# the grid mostly come back unchanged). Against ggml's quantizer at the same importance
# (benchmarks/codec_speed.py) the +113 ones lowered the weighted error by 5 %, the others by another 2 %.
_IQ4_NUMERATORS = torch.cat(
    [-127.0 - 6.0 * torch.arange(-2, 4), 113.0 + 6.0 * torch.arange(-2, 4), torch.tensor([-104.0, 89.0])]
)


# Nearest-level lookup in half grid units: every midpoint between two levels is a multiple of 1/2, so
# floor(2 v) says on which side of each midpoint v lies (an indexed read is ~10x cheaper than a bisection
# by torch.bucketize on CPU). Cells beyond +-150 grid units clamp to the end levels, which are nearest there.
_IQ4_HALF_UNITS = 300
_IQ4_CELL_CENTRES = torch.arange(-_IQ4_HALF_UNITS, _IQ4_HALF_UNITS + 1) / 2 + 0.25
_IQ4_CELL_INDEX = torch.bucketize(_IQ4_CELL_CENTRES, _IQ4_MIDPOINTS).to(torch.uint8)
_IQ4_CELL_VALUE = _IQ4_VALUES[_IQ4_CELL_INDEX.long()]


def _iq4_lookup(table: Tensor, v: Tensor) -> Tensor:
    """table[cell of v] for v in grid units (v is overwritten)."""
    # Clamped to non-negative first, the conversion's truncation is the floor.
    cells = v.mul_(2).add_(_IQ4_HALF_UNITS).clamp_(0, 2 * _IQ4_HALF_UNITS).to(torch.int32)
    return table.to(v.device).index_select(0, cells.reshape(-1)).view(v.shape)


def _iq4_index(v: Tensor) -> Tensor:
    """Index (uint8) of the level nearest each v, in grid units (v is overwritten)."""
    return _iq4_lookup(_IQ4_CELL_INDEX, v)


def _iq4_snap(v: Tensor) -> Tensor:
    """The level nearest each v, in grid units (v is overwritten)."""
    return _iq4_lookup(_IQ4_CELL_VALUE, v)


def _iq4_block_scales(x: Tensor, w: Tensor) -> Tensor:
    """Per-row (block of 32) float scale s with x ~ s * kvalues[q], weighted search."""
    return _fit_grid_scale(x, w, _iq4_snap, _candidates(_signed_max(x), _IQ4_NUMERATORS))


def _pack_iq4(q: Tensor) -> Tensor:
    """16 bytes per 32 indices: byte j holds q[j] in its low nibble, q[j + 16] in its high one."""
    return _pack(q.view(-1, 2, 16), 4)


def _unpack_iq4(b: Tensor) -> Tensor:
    """(N, 16 k) bytes -> (N, 32 k) grid values as float32."""
    q = _unpack(b.reshape(b.shape[0], -1, 16), 4, 2).reshape(b.shape[0], -1)
    return _IQ4_VALUES.to(b.device).index_select(0, q.reshape(-1).to(torch.int32)).view(q.shape)


def _iq4_nl_scales(x: Tensor, w: Tensor | None) -> Scales:
    w = _k_weights(x, w, 32, "square")  # quantize_iq4_nl without an imatrix weights by x^2
    return (_f16(_iq4_block_scales(x, w)),)


def _pack_iq4_nl(s: Scales, q: Tensor) -> Tensor:
    return torch.cat([_f16_bytes(s[0]), _pack_iq4(q)], dim=-1)


_IQ4_NL = Grid(32, 32, 0, 15, _iq4_nl_scales, _scale_only, _pack_iq4_nl, nonlinear=True)


def _decode_iq4_nl(b: Tensor) -> Tensor:
    return _read_f16(b[:, :2]) * _unpack_iq4(b[:, 2:])


def _iq4_xs_scales(x: Tensor, w: Tensor | None) -> Scales:
    n = x.shape[0]
    w = _k_weights(x, w, 32, "square")
    xs, ws = x.view(n, 8, 32), w.view(n, 8, 32)
    scale = _iq4_block_scales(xs.reshape(-1, 32), ws.reshape(-1, 32)).view(n, 8)
    g = _iq4_snap(xs * reciprocal(scale).unsqueeze(-1))
    # As for Q6_K: a sub-block's scale error costs sum(w g^2) in its values, to first order.
    return _quantize_signed(scale, (ws * g * g).sum(-1), -32, 31)


def _pack_iq4_xs(s: Scales, q: Tensor) -> Tensor:
    d, sc = s
    n = q.shape[0]
    ls = (sc + 32).to(torch.uint8)
    scales_h = _pack((ls >> 4).view(-1, 2, 4).transpose(-1, -2), 2)  # little-endian u16, 2 bits per sub-block
    scales_l = _pack((ls & 15).view(-1, 4, 2).transpose(-1, -2), 4)  # sub-block 2i low nibble, 2i+1 high
    return torch.cat([_f16_bytes(d), scales_h, scales_l, _pack_iq4(q.reshape(-1, 32)).view(n, 128)], dim=-1)


_IQ4_XS = Grid(QK_K, 32, 0, 15, _iq4_xs_scales, _k_symmetric_affine, _pack_iq4_xs, nonlinear=True)


def _decode_iq4_xs(b: Tensor) -> Tensor:
    high = _unpack(b[:, 2:4], 2, 4).transpose(-1, -2).reshape(-1, 8)
    low = _unpack(b[:, 4:8], 4, 2).transpose(-1, -2).reshape(-1, 8)
    dl = _read_f16(b[:, :2]) * ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    return (dl.unsqueeze(-1) * _unpack_iq4(b[:, 8:]).view(-1, 8, 32)).reshape(-1, QK_K)


# ---------------------------------------------------------------------------------------------------------
# Float types (block size 1)


def _encode_f32(x: Tensor, w: Tensor | None) -> Tensor:
    return x.contiguous().view(torch.uint8)


def _decode_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _encode_f16(x: Tensor, w: Tensor | None) -> Tensor:
    return x.to(torch.float16).view(torch.uint8)


def _decode_f16(b: Tensor) -> Tensor:
    return _read_f16(b)


_CODECS: dict[str, tuple[Encoder, Decoder]] = {
    "F32": (_encode_f32, _decode_f32),
    "F16": (_encode_f16, _decode_f16),
    "Q8_0": (_encode_q8_0, _decode_q8_0),
    "Q6_K": (_Q6_K.encode, _decode_q6_k),
    "Q5_1": (_encode_q5_1, _decode_q5_1),
    "Q5_K": (_Q5_K.encode, _decode_q5_k),
    "Q5_0": (_encode_q5_0, _decode_q5_0),
    "Q4_1": (_encode_q4_1, _decode_q4_1),
    "Q4_K": (_Q4_K.encode, _decode_q4_k),
    "Q4_0": (_encode_q4_0, _decode_q4_0),
    "Q3_K": (_Q3_K.encode, _decode_q3_k),
    "Q2_K": (_Q2_K.encode, _decode_q2_k),
    "TQ2_0": (_encode_tq2_0, _decode_tq2_0),
    "TQ1_0": (_encode_tq1_0, _decode_tq1_0),
    "IQ4_NL": (_IQ4_NL.encode, _decode_iq4_nl),
    "IQ4_XS": (_IQ4_XS.encode, _decode_iq4_xs),
    **LATTICE_CODECS,  # IQ3_S .. IQ2_XXS: codes chosen group by group, so no Grid (autosquash.formats.iq_lattice)
}
QUANTIZABLE_TYPES: tuple[str, ...] = tuple(_CODECS)
# The importance-weighted quantizer of every block type, in two steps (what `quantize` runs with importance).
_GRIDS: dict[str, Grid] = {
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
    """The two-step weighted quantizer of a block type (None for F32/F16, which have no scales)."""
    return _GRIDS.get(_codec(type_name)[0])


def _codec(type_name: str) -> tuple[str, Encoder, Decoder]:
    name = tensor_type(type_name).name
    if name not in _CODECS:
        raise AutosquashError(f"cannot quantize to GGUF type {name}; expected one of {', '.join(_CODECS)}")
    return (name, *_CODECS[name])


def importance_floor(importance: Tensor, cols: int, device: torch.device) -> Tensor:
    """Validated per-input-channel importance, floored so no block is left with all-zero weights."""
    imp = importance.detach().to(device, torch.float32).reshape(-1)
    if imp.numel() != cols:
        raise AutosquashError(f"importance has {imp.numel()} values; expected one per input channel ({cols})")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise AutosquashError("importance must be finite and non-negative")
    mean = float(imp.mean())
    return imp + 1e-6 * mean if mean > 0 else torch.ones_like(imp)


def checked_weight(weight: Tensor, name: str) -> Tensor:
    """`weight`, detached, after the checks every quantizer makes (2-D, non-empty, finite, rows of whole blocks);
    quantizers take it to float32 a slice of rows at a time (a bfloat16 table is not copied whole)."""
    if weight.ndim != 2:
        raise AutosquashError(f"quantize expects a 2-D weight; got shape {tuple(weight.shape)}")
    rows, cols = (int(s) for s in weight.shape)
    if rows == 0 or cols == 0:
        raise AutosquashError(f"cannot quantize an empty weight of shape {(rows, cols)}")
    t = tensor_type(name)
    if not t.fits_row(cols):
        raise AutosquashError(f"{name} needs rows that are a multiple of {t.block_size} values; got a row of {cols}")
    x = weight.detach()
    lo, hi = torch.aminmax(x)  # NaN propagates; one pass and no mask, 20x faster than isfinite(x).all()
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise AutosquashError(f"cannot quantize a weight with NaN or infinite values to {name}")
    return x


def chunk_rows(device: torch.device, width: int) -> int:
    """Rows of `width` values a scale search takes at once: on a CPU its temporaries (a few dozen candidates
    times its input) stay in cache; a GPU's search runs in a few large steps."""
    return max(1, (_CHUNK_VALUES if device.type == "cpu" else _CHUNK_VALUES_GPU) // width)


def search_weights(imp: Tensor, row_mean_sq: Tensor, x: Tensor) -> Tensor:
    """Per-value weights of the scale search for values x (rows, k) of columns with importance `imp` (k,),
    `row_mean_sq` (rows, 1) the mean square of each whole row: llama.cpp's imatrix weighting,
    importance * sqrt(sigma^2 + x^2), which also favours large weights."""
    return imp * (row_mean_sq + x.square()).sqrt()


def for_each_slice(device: torch.device, rows: int, step: int, work: Callable[[int, int], None]) -> None:
    """work(start, stop) for each slice of `step` rows in turn; on a CPU, slices at once on torch's threads,
    each with one torch thread of its own (restored after).

    A quantizer issues hundreds of mid-sized torch calls per slice. Split over OpenMP threads, every call
    ends in a barrier, and on a machine whose cores are shared one descheduled thread stalls them all: two
    threads were 10x slower than one (Q4_K's weighted search of 8,192 x 1,536: 36.7 s against 3.5 s, load
    average 8 on 2 cores), where a slice per thread took 2.5 s. On the idle machine a slice per thread ran
    1.7x as fast as one thread (43,690 x 1,536 Q4_0: quantize_no_worse 3.2 -> 1.9 s, compensated 10.6 -> 6.0 s).
    """
    threads = torch.get_num_threads()
    slices = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    if device.type != "cpu" or threads == 1 or len(slices) == 1:
        for a, b in slices:
            work(a, b)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(slices))) as pool:
            for done in [pool.submit(work, a, b) for a, b in slices]:
                done.result()
    finally:
        torch.set_num_threads(threads)


def quantize(weight: Tensor, type_name: str, importance: Tensor | None = None) -> QuantizedTensor:
    """Quantize a 2-D weight (rows along the last dim) to GGUF type `type_name` (ggml-common.h layouts).

    `importance` (shape (in,)) weights the scale search per input channel as llama.cpp's imatrix does.
    The search runs on the weight's device (a GPU's blocks search in a few large steps, a CPU's slices
    `for_each_slice`); the bytes come back to host memory.
    """
    name, encode, _ = _codec(type_name)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    t = tensor_type(name)
    imp = None if importance is None else importance_floor(importance, cols, x.device)
    data = np.empty((rows, t.nbytes((1, cols))), np.uint8)

    def work(a: int, b: int) -> None:
        xr = x[a:b].to(torch.float32).contiguous()
        if imp is None:
            w = None
        elif name in LATTICE_CODECS:  # llama.cpp weights these by each super-block's mean square, not the row's
            w = lattice_weights(name, imp, xr)
        else:
            w = search_weights(imp, xr.square().mean(-1, keepdim=True), xr)
        if w is not None:
            w = w.reshape(-1, t.block_size)
        data[a:b] = encode(xr.reshape(-1, t.block_size), w).reshape(b - a, -1).cpu().numpy()

    for_each_slice(x.device, rows, chunk_rows(x.device, cols), work)
    return QuantizedTensor(type=name, shape=(rows, cols), data=data)


def _better_on_grid(g: Grid, xb: Tensor, sw: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks xb coded with the scales searched with weights sw and with the reference weights, each block
    the better by w: its bytes and values (`Grid.values` gives what the bytes decode to, exactly)."""
    fits = []
    for weights in (sw, None):
        scales = g.scales(xb, weights)
        affine = g.affine(scales)
        codes = g.codes(xb, *affine)
        values = g.values(codes, *affine)
        fits.append((scales, codes, values, (values - xb).square_().mul_(w).sum(-1)))
    (scales, codes, values, err), (p_scales, p_codes, p_values, p_err) = fits
    better = p_err < err

    def pick(plain: Tensor, weighted: Tensor) -> Tensor:
        return torch.where(better.view(-1, *[1] * (plain.ndim - 1)), plain, weighted)

    scales = tuple(pick(p, f) for p, f in zip(p_scales, scales, strict=True))
    return g.pack(scales, pick(p_codes, codes)), pick(p_values, values)


def no_worse_rows(x: Tensor, type_name: str, imp: Tensor) -> tuple[Tensor, Tensor]:
    """Rows x (r, cols, float32) in block type `type_name`, each block the better, by the importance-weighted
    squared error, of the weighted encoding and the reference (unweighted) one; imp (cols,) as
    `importance_floor` returns it. Returns the bytes (r, row bytes) and the values they decode to, on x's
    device."""
    name, encode, decode = _codec(type_name)
    g, block = _GRIDS[name], tensor_type(name).block_size
    rows, cols = x.shape
    step = chunk_rows(x.device, cols)
    parts = []
    for a in range(0, rows, step):
        xr = x[a : a + step]
        xb = xr.reshape(-1, block)
        sw = search_weights(imp, xr.square().mean(-1, keepdim=True), xr).reshape(-1, block)
        w = imp.expand(xr.shape[0], cols).reshape(-1, block)
        if encode == g.encode:  # both encodings on the grid: the better scales and codes packed once
            parts.append(_better_on_grid(g, xb, sw, w))
            continue
        weighted, plain = g.encode(xb, sw), encode(xb, None)
        values, plain_values = decode(weighted), decode(plain)
        err, plain_err = ((v - xb).square_().mul_(w).sum(-1) for v in (values, plain_values))
        better = (plain_err < err).unsqueeze(-1)
        parts.append((torch.where(better, plain, weighted), torch.where(better, plain_values, values)))
    data, values = zip(*parts, strict=True)
    return torch.cat(data).view(rows, -1), torch.cat(values).view(rows, cols)


def quantize_no_worse(weight: Tensor, type_name: str, importance: Tensor) -> QuantizedTensor:
    """`quantize` weighted by `importance`, each block then the better, by the importance-weighted error, of
    that and the reference (unweighted) encoding: a weight already on the type's grid comes back exactly.
    Runs on the weight's device a slice of rows at a time (`for_each_slice`); only the bytes come back to host
    memory."""
    name = tensor_type(type_name).name
    if name not in _GRIDS:
        return quantize(weight, name)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    imp = importance_floor(importance, cols, x.device)
    data = np.empty((rows, tensor_type(name).nbytes((1, cols))), np.uint8)

    def work(a: int, b: int) -> None:
        data[a:b] = no_worse_rows(x[a:b].to(torch.float32), name, imp)[0].cpu().numpy()

    for_each_slice(x.device, rows, chunk_rows(x.device, cols), work)
    return QuantizedTensor(type=name, shape=(rows, cols), data=data)


def dequantize(q: QuantizedTensor, device: torch.device | str | None = None) -> Tensor:
    """Decode `q` to float32 (shape q.shape) with the arithmetic of gguf.quants.dequantize (ggml layouts),
    on `device` (the CPU by default): the bytes travel there, not the four-times-larger floats."""
    name = _codec(q.type)[0]
    t = tensor_type(name)
    rows, cols = q.shape
    expected = (rows, t.nbytes((1, cols)))
    if q.data.dtype != np.uint8 or tuple(q.data.shape) != expected:
        raise AutosquashError(
            f"{name} data for shape {q.shape} must be uint8 of shape {expected}; got {q.data.dtype} {q.data.shape}"
        )
    b = torch.from_numpy(np.array(q.data, copy=True))
    if device is not None and torch.device(device).type != "cpu":
        return decode_rows(b.to(device), name, cols)
    # On a CPU, slices of rows decode on torch's threads at once: the compiled decoders run one thread each.
    out = torch.empty(rows, cols, device=b.device)

    def work(a: int, z: int) -> None:
        out[a:z] = decode_rows(b[a:z], name, cols)

    for_each_slice(b.device, rows, max(1, -(-rows // (4 * torch.get_num_threads()))), work)
    return out


def decode_rows(data: Tensor, type_name: str, cols: int) -> Tensor:
    """Bytes (rows, row bytes) uint8 of type `type_name` decoded to float32 (rows, cols) on their device."""
    name, _, decode = _codec(type_name)
    return decode(data.reshape(-1, tensor_type(name).block_bytes)).reshape(data.shape[0], cols)


def fake_quantize(weight: Tensor, type_name: str, importance: Tensor | None = None) -> Tensor:
    """The float32 weights a GGUF file of this type holds: dequantize(quantize(weight, type_name, importance))."""
    return dequantize(quantize(weight, type_name, importance))
