"""The importance-weighted scale searches of every block type with a grid of codes (llama.cpp ggml-quants.c:
make_qx_quants, make_qkx2_quants, make_qp_quants ideas): per row of values, the scale (or scale and min) with
the lowest weighted squared error, candidates first, then assign/refit rounds that can only lower it; and each
type's scale fields from them (the K-quants', the ternary types', IQ4_NL's and IQ4_XS's).

The searches take rows of values (rows, n) but work on the transpose with all candidates at once, (n, C, rows):
sums over the short value axis become vector adds and per-row scalars broadcast contiguously, about 2x faster
on CPU than reducing an innermost axis of 16 or 32 values, one candidate at a time. On a CPU the searches over
integer codes run compiled (kernels), a sub-block at a time, with the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from autosquash.compress.quantize import kernels
from autosquash.formats.bits import f16_rounded
from autosquash.formats.codecs import IQ4_VALUES, QK_K, Scales, compiled, numpy32

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


# ---------------------------------------------------------------------------------------------------------
# Searches over integer or grid codes


def signed_max(x: Tensor) -> Tensor:
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


# What a row's scale candidates are relative to (kernels._reference takes their positions).
_REFERENCES: tuple[Callable[[Tensor], Tensor], ...] = (signed_max, lambda x: x.amax(-1), lambda x: x.abs().amax(-1))
_SIGNED_MAX, _MAX, _ABS_MAX = range(3)


def _fit_scale(x: Tensor, w: Tensor, lo: int, hi: int, numerators: Tensor, reference: int) -> Tensor:
    """Per-row scale s minimising sum w (x - s q)^2 with integer codes q in [lo, hi] (symmetric grids), the
    candidates 1/s `_candidates` of the row's `_REFERENCES[reference]`; on a CPU compiled (kernels.fit_scale,
    as `_fit_affine`, the candidates worked out there)."""
    if compiled(x):
        out = np.empty(x.shape[0], np.float32)
        kernels.fit_scale(numpy32(x), numpy32(w), lo, hi, numpy32(numerators), reference, _REFINE_STEPS, out)
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


def signed_scale(v: Tensor, w: Tensor, lo: int, hi: int) -> Tensor:
    """Per-row f16 scale d for codes in [lo, hi] (lo < 0) with v ~ d * codes, weighted search.

    Candidates map the largest-magnitude value to about lo: on the grids with an extra negative level
    (Q4_0's -8..7) that level is then used for the largest value, as llama.cpp does.
    """
    return f16_rounded(_fit_scale(v, w, lo, hi, lo - _SCALE_OFFSETS, _SIGNED_MAX))


def _quantize_signed(v: Tensor, w: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """`signed_scale` and the codes in [lo, hi] against it."""
    d = signed_scale(v, w, lo, hi)
    return d, _codes(v, d.unsqueeze(-1), lo, hi)


def _quantize_nonneg(v: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """Per-row f16 scale d and codes in [0, nmax] for non-negative v (K-quant sub-block scales and mins)."""
    d = f16_rounded(_fit_scale(v, w, 0, nmax, nmax + _SCALE_OFFSETS, _MAX))
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

    On a CPU the compiled search of kernels.fit_affine runs it, a sub-block at a time (the same
    arithmetic); elsewhere, or with formats.codecs.COMPILED_CPU off, the torch ops below, all candidates at once."""
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


def _fit_affine_compiled(x: Tensor, w: Tensor, nmax: int, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    """`_fit_affine` by kernels.fit_affine."""
    scale, mn = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
    numerators = (nmax + _AFFINE_OFFSETS).numpy()
    kernels.fit_affine(
        numpy32(x), numpy32(w), nmax, min_le_zero, numerators, _REFINE_STEPS, np.float32(_DET_EPS), scale, mn
    )
    return torch.from_numpy(scale), torch.from_numpy(mn)


# ---------------------------------------------------------------------------------------------------------
# Each type's scale fields: the legacy types, the K-quants (llama.cpp's *_ref weights without importance), the
# ternary types


def affine_legacy_scales(x: Tensor, w: Tensor, nmax: int) -> Scales:
    """Q4_1/Q5_1: per-block f16 (scale, min) for codes in [0, nmax], weighted search."""
    scale, mn = _fit_affine(x, w, nmax, min_le_zero=False)
    return f16_rounded(scale), f16_rounded(mn)


def k_weights(x: Tensor, w: Tensor | None, sub: int, default: Literal["rms+abs", "abs", "square"]) -> Tensor:
    """Per-value search weights: the importance weights if given, else llama.cpp's *_ref defaults."""
    if w is not None:
        return w
    if default == "rms+abs":  # quantize_row_q4_K_ref / q5_K: av_x + |x| per sub-block
        xs = x.view(x.shape[0], -1, sub)
        return (xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()).view_as(x)
    if default == "abs":  # quantize_row_q2_K_ref
        return x.abs()
    return x.square()  # make_qx_quants rmse_type 1 / make_q3_quants (Q3_K, Q6_K)


def affine_k(x: Tensor, w: Tensor, sub: int, nmax: int, scale_nmax: int) -> Scales:
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


def _symmetric_k_arrays(n: int, nmax: int, scale_nmax: int) -> tuple[np.ndarray, ...]:
    """What the compiled Q3_K/Q6_K passes fill for n super-blocks (d, sc, q) after the two searches' candidates."""
    candidates = (numpy32(-nmax - _SCALE_OFFSETS), numpy32(-scale_nmax - _SCALE_OFFSETS))
    return *candidates, np.empty(n, np.float32), np.empty((n, 16), np.int8), np.empty((n, QK_K), np.int8)


def symmetric_k_codes(x: Tensor, w: Tensor, nmax: int, scale_nmax: int) -> tuple[Scales, Tensor]:
    """`symmetric_k`'s scales and the codes nearest under them (Grid.codes), for CPU tensors: one compiled pass
    per super-block (kernels.fit_symmetric_k), sc and the codes as int8."""
    numerators, scale_numerators, d, sc, q = _symmetric_k_arrays(x.shape[0], nmax, scale_nmax)
    kernels.fit_symmetric_k(
        numpy32(x), numpy32(w), nmax, scale_nmax, numerators, scale_numerators, _REFINE_STEPS, d, sc, q
    )
    return (torch.from_numpy(d), torch.from_numpy(sc)), torch.from_numpy(q)


def symmetric_k_better(x: Tensor, sw: Tensor, imp: Tensor, nmax: int, scale_nmax: int) -> tuple[Scales, Tensor, Tensor]:
    """Rows x (rows, cols) of CPU tensors, search weights sw alike, importance imp (cols,): each super-block the
    better, by the importance-weighted error, of `symmetric_k_codes` under sw and under the reference weights
    (kernels.better_symmetric_k, one compiled pass): its scales, codes (N, 256) and x's values."""
    numerators, scale_numerators, d, sc, q = _symmetric_k_arrays(x.shape[0] * x.shape[1] // QK_K, nmax, scale_nmax)
    values = np.empty(x.shape, np.float32)
    arrays = (numpy32(x), numpy32(sw), numpy32(imp), nmax, scale_nmax, numerators, scale_numerators)
    kernels.better_symmetric_k(*arrays, _REFINE_STEPS, d, sc, q, values)
    return (torch.from_numpy(d), torch.from_numpy(sc)), torch.from_numpy(q), torch.from_numpy(values)


def symmetric_k(x: Tensor, w: Tensor, nmax: int, scale_nmax: int) -> Scales:
    """Q3_K/Q6_K: value = d * sc * q over sub-blocks of 16; (d, sc) with sc in [-scale_nmax, scale_nmax-1], for
    codes q in [-nmax, nmax-1]."""
    if compiled(x):
        return symmetric_k_codes(x, w, nmax, scale_nmax)[0]
    n = x.shape[0]
    xs, ws = x.view(n, -1, 16), w.view(n, -1, 16)
    flat = xs.reshape(-1, 16)
    scale = _fit_scale(flat, ws.reshape(-1, 16), -nmax, nmax - 1, -nmax - _SCALE_OFFSETS, _SIGNED_MAX).view(n, -1)
    q = _codes(xs, scale.unsqueeze(-1), -nmax, nmax - 1)
    return _quantize_signed(scale, (ws * q * q).sum(-1), -scale_nmax, scale_nmax - 1)


def ternary_scales(x: Tensor, w: Tensor) -> Scales:
    """TQ1_0/TQ2_0: per-super-block f16 d for codes in {-1, 0, 1}, weighted search."""
    return (f16_rounded(_fit_scale(x, w, -1, 1, _TERNARY_MULTIPLES, _ABS_MAX)),)


# ---------------------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS: scales over ggml's non-linear grid of 16 levels (formats.codecs.IQ4_VALUES)

_IQ4_MIDPOINTS = (IQ4_VALUES[1:] + IQ4_VALUES[:-1]) / 2

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
IQ4_HALF_UNITS = 300
_IQ4_CELL_CENTRES = torch.arange(-IQ4_HALF_UNITS, IQ4_HALF_UNITS + 1) / 2 + 0.25
IQ4_CELL_INDEX = torch.bucketize(_IQ4_CELL_CENTRES, _IQ4_MIDPOINTS).to(torch.uint8)
_IQ4_CELL_VALUE = IQ4_VALUES[IQ4_CELL_INDEX.long()]


def _iq4_lookup(table: Tensor, v: Tensor) -> Tensor:
    """table[cell of v] for v in grid units (v is overwritten)."""
    # Clamped to non-negative first, the conversion's truncation is the floor.
    cells = v.mul_(2).add_(IQ4_HALF_UNITS).clamp_(0, 2 * IQ4_HALF_UNITS).to(torch.int32)
    return table.to(v.device).index_select(0, cells.reshape(-1)).view(v.shape)


def iq4_index(v: Tensor) -> Tensor:
    """Index (uint8) of the level nearest each v, in grid units (v is overwritten)."""
    return _iq4_lookup(IQ4_CELL_INDEX, v)


def _iq4_snap(v: Tensor) -> Tensor:
    """The level nearest each v, in grid units (v is overwritten)."""
    return _iq4_lookup(_IQ4_CELL_VALUE, v)


def _iq4_block_scales(x: Tensor, w: Tensor) -> Tensor:
    """Per-row (block of 32) float scale s with x ~ s * kvalues[q], weighted search."""
    return _fit_grid_scale(x, w, _iq4_snap, _candidates(signed_max(x), _IQ4_NUMERATORS))


def iq4_nl_scales(x: Tensor, w: Tensor | None) -> Scales:
    """IQ4_NL: per-block f16 d over the 16 levels, weighted search."""
    w = k_weights(x, w, 32, "square")  # quantize_iq4_nl without an imatrix weights by x^2
    return (f16_rounded(_iq4_block_scales(x, w)),)


def iq4_xs_scales(x: Tensor, w: Tensor | None) -> Scales:
    """IQ4_XS: per-super-block f16 d and 6-bit signed sub-block scales sc (d * sc per 32 values), weighted search."""
    n = x.shape[0]
    w = k_weights(x, w, 32, "square")
    xs, ws = x.view(n, 8, 32), w.view(n, 8, 32)
    scale = _iq4_block_scales(xs.reshape(-1, 32), ws.reshape(-1, 32)).view(n, 8)
    g = _iq4_snap(xs * reciprocal(scale).unsqueeze(-1))
    # As for Q6_K: a sub-block's scale error costs sum(w g^2) in its values, to first order.
    return _quantize_signed(scale, (ws * g * g).sum(-1), -32, 31)
