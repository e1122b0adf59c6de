"""The scale searches of the K-quants and legacy types compiled for the CPU (scales.fit_affine, scales.fit_scale),
one sub-block at a time, and Q3_K's and Q6_K's whole encoding (fit_symmetric_k: scales and codes in one pass).

On a GPU the search runs as torch ops over all candidates at once. On a CPU that layout streams each
candidate's temporaries through memory a dozen times (Q4_K of a 1.5B model: about 150 s on 2 cores, 89 %
of it in that search); here every sub-block's candidates are tried in registers, with the same arithmetic
(float32, candidates in the same order, ties to the first, codes rounded half to even as torch rounds), so
the two paths choose the same scales up to the order of their sums (float64 in fit_affine's centred fit).
tests/compress/quantize/test_kernels.py holds each beside its torch path.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_F = np.float32
_FAST = {"reassoc", "contract"}


@njit(nogil=True, cache=True, fastmath=_FAST)
def _code(v, step_inv, nmax):  # pragma: no cover - compiled
    return min(max(np.rint(v * step_inv), _F(0.0)), _F(nmax))


@njit(nogil=True, cache=True, fastmath=_FAST)
def _fit_codes(x, w, xc, shift, step_inv, nmax, sw, xbar, sxx, swxc, min_le_zero, det_eps):  # pragma: no cover
    """(scale, min, err) of the weighted least-squares fit x ~ scale * q + min for the codes
    q = clamp(round((x - shift) * step_inv), 0, nmax), with codes centred on their weighted mean
    (scales._lsq_affine's arithmetic). One pass: the centred sums come from raw ones in float64, so that a
    weight a million times the others' still cancels to well under det_eps."""
    swq = 0.0
    swqq = 0.0
    swqx = 0.0
    for j in range(x.shape[0]):
        q = np.float64(_code(x[j] - shift, step_inv, nmax))
        wq = w[j] * q
        swq += wq
        swqq += wq * q
        swqx += wq * xc[j]
    qbar = swq / max(sw, 1e-30)
    sqq = swqq - swq * qbar
    sxq = swqx - qbar * swxc
    scale = sxq / sqq if sqq > det_eps * sw * max(qbar * qbar, 1.0) else 0.0
    mn = xbar - scale * qbar
    err = sxx - scale * sxq
    if min_le_zero and mn > 0:
        raw_xq = sxq + sw * xbar * qbar
        scale = raw_xq / max(swqq, 1e-30) if swqq > 0 else 0.0
        err = sxx + sw * xbar * xbar - scale * raw_xq
        mn = 0.0
    return scale, mn, err


@njit(nogil=True, cache=True, fastmath=_FAST)
def fit_affine(x, w, nmax, min_le_zero, numerators, refine_steps, det_eps, scale_out, min_out):  # pragma: no cover
    """Per row of x (rows, n) float32, weights w alike: the (scale, min) of scales.fit_affine, written into
    scale_out and min_out (rows,). `numerators` (C,) float32 are the candidates' nmax + offsets."""
    rows, n = x.shape
    xc = np.empty(n, np.float64)
    wd = np.empty(n, np.float64)
    for r in range(rows):
        xr, wr = x[r], w[r]
        sw = 0.0
        swx = 0.0
        xmin = xr[0]
        xmax = xr[0]
        for j in range(n):
            wd[j] = wr[j]
            sw += wd[j]
            swx += wd[j] * xr[j]
            xmin = min(xmin, xr[j])
            xmax = max(xmax, xr[j])
        xbar = swx / max(sw, 1e-30)
        sxx = 0.0
        swxc = 0.0
        for j in range(n):
            xc[j] = xr[j] - xbar
            swxc += wd[j] * xc[j]
            sxx += wd[j] * xc[j] * xc[j]
        if min_le_zero:
            xmin = min(xmin, _F(0.0))
        ref = xmax - xmin
        inv = _F(1.0) / ref if ref != 0 else _F(0.0)
        best_s, best_m, best_err = 0.0, 0.0, np.inf
        for c in range(numerators.shape[0]):
            s, m, err = _fit_codes(
                xr, wd, xc, xmin, numerators[c] * inv, nmax, sw, xbar, sxx, swxc, min_le_zero, det_eps
            )
            if err < best_err or c == 0:
                best_s, best_m, best_err = s, m, err
        for _ in range(refine_steps):
            step_inv = _F(1.0) / _F(best_s) if best_s != 0 else _F(0.0)
            s, m, err = _fit_codes(xr, wd, xc, _F(best_m), step_inv, nmax, sw, xbar, sxx, swxc, min_le_zero, det_eps)
            if err < best_err:
                best_s, best_m, best_err = s, m, err
        scale_out[r] = best_s
        min_out[r] = best_m


@njit(nogil=True, cache=True, fastmath=_FAST)
def _reference(xr, kind):  # pragma: no cover - compiled
    """A row's value the scale candidates are relative to (scales._REFERENCES, in that order): its value of
    largest magnitude, sign kept, the first on ties; its largest value; its largest magnitude."""
    best = xr[0]
    for j in range(1, xr.shape[0]):
        if kind == 0:
            if abs(xr[j]) > abs(best):
                best = xr[j]
        elif kind == 1:
            best = max(best, xr[j])
        else:
            best = max(abs(best), abs(xr[j]))
    return abs(best) if kind == 2 else best


@njit(nogil=True, cache=True, fastmath=_FAST)
def _row_scale(xr, wr, lo, hi, numerators, kind, refine_steps):  # pragma: no cover - compiled
    """scales._fit_scale of one row: each candidate 1 / scale numerators[c] / the row's `_reference` of that
    kind, then `refine_steps` rounds from the best; float32 sums, as torch's."""
    ref = _reference(xr, kind)
    ref_inv = _F(1.0) / ref if ref != 0 else _F(0.0)
    best, best_gain = _F(0.0), _F(0.0)
    for c in range(numerators.shape[0] + refine_steps):
        if c < numerators.shape[0]:
            inv = numerators[c] * ref_inv
        else:
            inv = _F(1.0) / best if best != 0 else _F(0.0)
        sum_xq = _F(0.0)
        sum_qq = _F(0.0)
        for j in range(xr.shape[0]):
            q = min(max(np.rint(xr[j] * inv), _F(lo)), _F(hi))
            wq = wr[j] * q
            sum_xq += wq * xr[j]
            sum_qq += wq * q
        scale = sum_xq / sum_qq if sum_qq > 0 else _F(0.0)
        gain = scale * sum_xq
        if c == 0 or gain > best_gain:
            best, best_gain = scale, gain
    return best


@njit(nogil=True, cache=True, fastmath=_FAST)
def fit_scale(x, w, lo, hi, numerators, kind, refine_steps, scale_out):  # pragma: no cover - compiled
    """Per row of x (rows, n) float32, weights w alike: the scale of scales._fit_scale for integer codes in
    [lo, hi] (`_row_scale`), written into scale_out (rows,)."""
    for r in range(x.shape[0]):
        scale_out[r] = _row_scale(x[r], w[r], lo, hi, numerators, kind, refine_steps)


@njit(nogil=True, cache=True)
def _f16(v):  # pragma: no cover - compiled
    """v rounded to the nearest float16, ties to even, beyond its largest value infinite (formats.bits.f16_rounded)."""
    a = abs(np.float64(v))
    if a == 0.0:
        return _F(0.0)
    _, e = math.frexp(a)  # a = m 2^e, m in [0.5, 1): f16 keeps 11 significant bits, down to 2^-24
    quantum = math.ldexp(1.0, max(e - 11, -24))
    r = np.rint(a / quantum) * quantum
    r = np.inf if r > 65504.0 else r
    return _F(r if v > 0 else -r)


@njit(nogil=True, cache=True, fastmath=_FAST)
def _code_symmetric(v, inv, nmax):  # pragma: no cover - compiled
    return np.int8(min(max(np.rint(v * inv), _F(-nmax)), _F(nmax - 1)))


@njit(nogil=True, cache=True, fastmath=_FAST)
def _symmetric_block(
    xr, wr, nmax, scale_nmax, numerators, scale_numerators, refine_steps, scale, weight, sc, q
):  # pragma: no cover
    """One super-block of `fit_symmetric_k`: its sc (16,) and q (256,) written, its d returned; scale and weight
    (16,) are room for the sub-blocks' scales and weights."""
    for k in range(16):
        xs, ws = xr[16 * k : 16 * k + 16], wr[16 * k : 16 * k + 16]
        s = _row_scale(xs, ws, -nmax, nmax - 1, numerators, 0, refine_steps)
        inv = _F(1.0) / s if s != 0 else _F(0.0)
        acc = _F(0.0)
        for j in range(16):
            c = _F(_code_symmetric(xs[j], inv, nmax))
            acc += ws[j] * c * c
        scale[k] = s
        weight[k] = acc
    d = _f16(_row_scale(scale, weight, -scale_nmax, scale_nmax - 1, scale_numerators, 0, refine_steps))
    d_inv = _F(1.0) / d if d != 0 else _F(0.0)
    for k in range(16):
        sc[k] = _code_symmetric(scale[k], d_inv, scale_nmax)
        step = d * _F(sc[k])
        inv = _F(1.0) / step if step != 0 else _F(0.0)
        for j in range(16 * k, 16 * k + 16):
            q[j] = _code_symmetric(xr[j], inv, nmax)
    return d


@njit(nogil=True, cache=True, fastmath=_FAST)
def fit_symmetric_k(x, w, nmax, scale_nmax, numerators, scale_numerators, refine_steps, d, sc, q):  # pragma: no cover
    """Q3_K / Q6_K super-blocks x (N, 256) float32, weights w alike, in one pass each (scales.symmetric_k and
    Grid.codes' arithmetic): every sub-block of 16's scale (`_row_scale`, codes in [-nmax, nmax - 1]), the f16 d
    of those 16 scales weighted by their codes' sum of w q^2 (codes in [-scale_nmax, scale_nmax - 1]), written
    into d (N,), the sub-block codes into sc (N, 16) int8 and the value codes under d * sc into q (N, 256) int8.
    `numerators` and `scale_numerators` are the two searches' candidates (scales._SCALE_OFFSETS below -nmax)."""
    scale = np.empty(16, np.float32)
    weight = np.empty(16, np.float32)
    for r in range(x.shape[0]):
        d[r] = _symmetric_block(
            x[r], w[r], nmax, scale_nmax, numerators, scale_numerators, refine_steps, scale, weight, sc[r], q[r]
        )


@njit(nogil=True, cache=True, fastmath=_FAST)
def _symmetric_values(d, sc, q, out):  # pragma: no cover - compiled
    """A super-block's values q * (d * sc) (Grid.values' arithmetic) into out (256,)."""
    for k in range(16):
        step = d * _F(sc[k])
        for j in range(16 * k, 16 * k + 16):
            out[j] = _F(q[j]) * step


@njit(nogil=True, cache=True, fastmath=_FAST)
def better_symmetric_k(
    x, sw, imp, nmax, scale_nmax, numerators, scale_numerators, refine_steps, d, sc, q, values
):  # pragma: no cover
    """quantize.no_worse_rows for Q3_K / Q6_K in one pass: rows x (rows, cols) float32, their search weights sw
    alike (quantize.search_weights), importance imp (cols,); each super-block encoded (`_symmetric_block`)
    under sw and under the reference weights x^2, the one with the lower imp-weighted squared error kept (the
    reference on a strict win): its d, sc and q into d (N,), sc (N, 16), q (N, 256) (N = rows * cols / 256,
    row by row), its values into values (rows, cols)."""
    per_row = x.shape[1] // 256
    scale, weight = np.empty(16, np.float32), np.empty(16, np.float32)
    ref, other = np.empty(256, np.float32), np.empty(256, np.float32)
    sc2, q2 = np.empty(16, np.int8), np.empty(256, np.int8)
    for r in range(x.shape[0]):
        for b in range(per_row):
            n, cut = r * per_row + b, slice(256 * b, 256 * b + 256)
            xb, ib, vb = x[r, cut], imp[cut], values[r, cut]
            for j in range(256):
                ref[j] = xb[j] * xb[j]
            args = (nmax, scale_nmax, numerators, scale_numerators, refine_steps, scale, weight)
            d1 = _symmetric_block(xb, sw[r, cut], *args, sc[n], q[n])
            d2 = _symmetric_block(xb, ref, *args, sc2, q2)
            _symmetric_values(d1, sc[n], q[n], vb)
            _symmetric_values(d2, sc2, q2, other)
            e1, e2 = _F(0.0), _F(0.0)
            for j in range(256):
                e1 += ib[j] * (vb[j] - xb[j]) ** 2
                e2 += ib[j] * (other[j] - xb[j]) ** 2
            d[n] = d1
            if e2 < e1:
                d[n] = d2
                sc[n, :] = sc2
                q[n, :] = q2
                vb[:] = other
