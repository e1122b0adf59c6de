"""Quantization with error compensation inside the GGUF grids, as GPTQ does (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

A linear's weight W (out, in) is coded one input column at a time, left to right. After column j is coded,
its error is spread onto the columns not yet coded so that the layer's output error on the calibration
inputs, tr((W - Ŵ) H (W - Ŵ)^T) with H = E[x x^T], stays as low as it can: with U the upper Cholesky
factor of H^-1, W[:, j+1:] -= (W[:, j] - Ŵ[:, j]) / U[j, j] * U[j, j+1:]. The stored bytes are the type's
GGUF blocks, unchanged: when the sweep reaches a block (32 values, or a K-quant super-block of 256), its
scales are chosen from the error-updated weights of that block by the same importance-weighted search as
`quantize` (compress.quantize.Grid), and its values are then coded against those scales column by column.
Columns are updated lazily (GPTQ's lazy batches): one by one within a run of 32, the rest of a batch of 128
(or of a super-block) by one matrix product per run, the columns beyond the batch by one per batch. Rows are
independent: they go through a slice at a time, so that a table of 150k rows needs no copy of itself. On a
CPU a compiled kernel codes each run of 32 a row at a time (`_code_run`), and the rest goes by matrix
products as above: torch's per-column calls over a slice of rows streamed it through memory a few times
per column.

With a diagonal H nothing is spread and the bytes are exactly `quantize(W, type, diag(H))`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit
from torch import Tensor

from autosquash.compress.quantize import (
    Grid,
    checked_weight,
    chunk_rows,
    grid,
    importance_floor,
    no_worse_rows,
    quantize,
    search_weights,
)
from autosquash.compress.quantize.scales import reciprocal
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QuantizedTensor, Scales, compiled, decode_rows
from autosquash.formats.gguf_types import tensor_type
from autosquash.formats.slices import for_each_slice

_LAZY = 32  # columns updated one by one at a time, the rest of their batch by one matrix product per 32
_BATCH = 128  # columns (or one K-quant super-block) coded before the columns after them are updated
# Weights one sweep takes at once, and the fewest rows worth a slice of their own. Each column's coding is a
# handful of torch calls on a slice's rows: a GPU's slices are big, for few kernel launches. A CPU's slices run
# one per torch thread (for_each_slice), and every call hands the GIL to the other thread: with one of
# the 2 cores taken by another process, 2^24-value slices of a 87,381 x 1,536 Q4_0 table took 33 s against
# 21 s on one thread, 2^26-value ones 25 s against 22 s. 2^25 values keep a slice's copies (weights, errors,
# decoded values) about 128 MB each. The compiled sweep (`_sweep_compiled`) makes a few dozen calls per block
# instead, and small slices keep its matrix products' operands near the cores: 65,536 rows of Qwen2.5-1.5B's
# head at Q4_K, compensated on 2 threads, took 11.0 s in slices of 21,845 rows, 7.8 s in 8,192, 7.0 s in
# 4,096, 6.9 s in 2,048 and 7.1 s in 1,024.
_SWEEP_VALUES = 1 << 25
_SWEEP_VALUES_COMPILED = 1 << 22
_SWEEP_VALUES_GPU = 1 << 26
_MIN_SLICE_ROWS = 8192
_TILE = 64  # rows the compiled sweep codes together (a run of 32 columns of them: 8 KB)
_ZERO = np.float32(0)
DAMP = 0.01  # dampening added to H's diagonal, as a share of its mean diagonal (GPTQ's default)


def _inverse_cholesky(hessian: Tensor, cols: int, damp: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """U, the upper Cholesky factor of the damped H^-1, (H + damp * mean(diag H) * I)^-1; L, the lower one of
    the damped H itself; and what was added to H's diagonal to damp it (cols,): all float32 on `device`.

    Inputs never seen in calibration (a zero row and column of H) get a unit diagonal: they take and give
    no error. Where rounding leaves the damped H short of positive definite, the dampening grows tenfold.
    """
    h = hessian.detach().to(device, torch.float64)
    if h.shape != (cols, cols):
        raise AutosquashError(f"hessian has shape {tuple(h.shape)}; expected ({cols}, {cols}), one row per input")
    if not bool(torch.isfinite(h).all()):
        raise AutosquashError("hessian must be finite")
    h = (h + h.T) / 2
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    for attempt in range(4):
        added = damp * 10**attempt * mean
        damped = h + added * torch.eye(cols, dtype=h.dtype, device=device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u.to(torch.float32), chol.to(torch.float32), (added + dead.to(h.dtype)).to(torch.float32)
    raise AutosquashError("hessian is not positive semi-definite (its damped Cholesky failed)")


def _scales(g: Grid, x: Tensor, w: Tensor) -> Scales:
    """`g.scales` of rows x (rows, block), a slice of rows at a time as `quantize` searches them (the
    search's temporaries are a few dozen candidates times its input: a whole table's column at once spills
    out of the CPU's caches, about twice as slow)."""
    step = chunk_rows(x.device, g.block)
    if step >= x.shape[0]:
        return g.scales(x, w)
    parts = [g.scales(x[a : a + step], w[a : a + step]) for a in range(0, x.shape[0], step)]
    return tuple(torch.cat(fields) for fields in zip(*parts, strict=True))


def _sweep_rows(x: Tensor) -> int:
    """Rows of x (rows, cols) one sweep takes: for the torch ops on a CPU, a share of the rows for each of
    torch's threads (but at least _MIN_SLICE_ROWS: a block linear's few rows go through whole)."""
    rows, cols = x.shape
    if x.device.type != "cpu":
        return max(1, _SWEEP_VALUES_GPU // cols)
    if compiled(x):
        return max(1, _SWEEP_VALUES_COMPILED // cols)
    share = -(-rows // torch.get_num_threads())
    return max(_MIN_SLICE_ROWS, min(_SWEEP_VALUES // cols, share))


def _sweep(g: Grid, x: Tensor, u: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    """Rows x (r, cols) coded column by column with their errors spread through U: the bytes (r, row bytes)
    and each row's sum of squared scaled errors, which is its output error by the damped H (w - ŵ = e U, so
    (w - ŵ) U^-1 U^-T (w - ŵ)ᵀ = e eᵀ). Torch's ops on a GPU (or with formats.codecs.COMPILED_CPU off), the
    compiled kernel on a CPU."""
    if compiled(x):
        return _sweep_compiled(g, x, u, imp)
    rows, cols = x.shape
    row_mean_sq = x.square().mean(-1, keepdim=True)
    # Worked on transposed, one input column per (contiguous) row, so that coding a column and the rank-one
    # update of those after it read and write whole rows of memory.
    xt = x.T.contiguous()
    err = torch.empty_like(xt)  # each column's error, scaled by 1 / U[j, j]
    u_diag = u.diagonal().tolist()
    batch = max(g.block, _BATCH)
    blocks = []
    for b0 in range(0, cols, batch):
        b1 = min(b0 + batch, cols)
        for c0 in range(b0, b1, g.block):
            c1 = c0 + g.block
            xb = xt[c0:c1].T.contiguous()
            scales = _scales(g, xb, search_weights(imp[c0:c1], row_mean_sq, xb))
            step, offset = (None if a is None else a.T.contiguous() for a in g.affine(scales))
            inv_step = reciprocal(step)
            codes = torch.empty_like(xt[c0:c1])
            for s0 in range(c0, c1, _LAZY):
                s1 = min(s0 + _LAZY, c1)
                for j in range(s0, s1):
                    k = (j - c0) // g.sub
                    col, q = xt[j], codes[j - c0]
                    v = col if offset is None else col - offset[k]
                    c = g.nearest(torch.mul(v, inv_step[k], out=q))
                    if c is not q:
                        q.copy_(c)
                    # The error x - (level * step + offset), as (x - offset) - level * step: one pass fewer.
                    torch.addcmul(v, g.levels(q), step[k], value=-1, out=err[j]).div_(u_diag[j])
                    if j + 1 < s1:
                        xt[j + 1 : s1].addr_(u[j, j + 1 : s1], err[j], alpha=-1)
                if s1 < b1:
                    xt[s1:b1].addmm_(u[s0:s1, s1:b1].T, err[s0:s1], alpha=-1)
            blocks.append(g.pack(scales, codes.T.contiguous()).view(rows, -1))
        if b1 < cols:
            xt[b1:].addmm_(u[b0:b1, b1:].T, err[b0:b1], alpha=-1)
    return torch.cat(blocks, dim=-1), err.square_().sum(0)


@njit(nogil=True, cache=True, fastmath={"contract"})
def _code_run(
    xt, c0, s0, s1, sub, u, step, inv_step, offset, lo, hi, cells, half, levels, codes, err
):  # pragma: no cover - compiled
    """`_sweep`'s column loop over the run of columns s0..s1 (inside the block from c0) of xt (cols, r), worked
    on transposed as there: each column's codes (into codes (block, r)) under its sub-block's step and offset
    ((block // sub, r) each), its errors scaled by 1 / U[j, j] (into err (cols, r)), then those errors
    spread onto the run's later columns. _TILE rows at a time, so that the run's columns stay in the L1 cache
    while it is coded (torch's ops stream a slice's whole rows through memory for every column).
    A linear grid's code is round(v) clamped to [lo, hi] (its level); a non-linear one's is cells[cell of v]
    and its level levels[code] (`Grid.lookup`)."""
    nonlinear = cells.shape[0] > 0
    for r0 in range(0, xt.shape[1], _TILE):
        r1 = min(r0 + _TILE, xt.shape[1])
        for j in range(s0, s1):
            k = (j - c0) // sub
            x, off, inv, st = xt[j, r0:r1], offset[k, r0:r1], inv_step[k, r0:r1], step[k, r0:r1]
            q, e, d = codes[j - c0, r0:r1], err[j, r0:r1], u[j, j]
            if nonlinear:
                for t in range(r1 - r0):
                    v = x[t] - off[t]
                    c = cells[int(min(max(v * inv[t] * np.float32(2) + np.float32(half), _ZERO), np.float32(2 * half)))]
                    q[t] = c
                    e[t] = (v - levels[c] * st[t]) / d
            else:
                for t in range(r1 - r0):
                    v = x[t] - off[t]
                    q[t] = min(max(np.rint(v * inv[t]), np.float32(lo)), np.float32(hi))
                    e[t] = (v - q[t] * st[t]) / d
            for i in range(j + 1, s1):
                later, uji = xt[i, r0:r1], u[j, i]
                for t in range(r1 - r0):
                    later[t] -= uji * e[t]


def _sweep_compiled(g: Grid, x: Tensor, u: Tensor, imp: Tensor) -> tuple[Tensor, Tensor]:
    """`_sweep` on a CPU: each block's scales chosen as there, its runs of 32 coded by `_code_run`, the rest
    updated by matrix products as there."""
    rows, cols = x.shape
    row_mean_sq = x.square().mean(-1, keepdim=True)
    xt = x.T.contiguous()
    err = torch.empty_like(xt)
    cells, half, levels = g.lookup()
    xt_n, u_n, err_n = xt.numpy(), u.numpy(), err.numpy()  # views the kernel writes through
    blocks = []
    for c0 in range(0, cols, g.block):
        c1 = c0 + g.block
        xb = xt[c0:c1].T.contiguous()
        scales = _scales(g, xb, search_weights(imp[c0:c1], row_mean_sq, xb))
        step, offset = (
            None if a is None else a.to(torch.float32).expand(rows, -1).T.contiguous() for a in g.affine(scales)
        )
        offset = torch.zeros_like(step) if offset is None else offset
        codes = torch.empty(g.block, rows, device=x.device)
        arrays = (step.numpy(), reciprocal(step).numpy(), offset.numpy(), g.lo, g.hi, cells, half, levels)
        for s0 in range(c0, c1, _LAZY):
            s1 = s0 + _LAZY
            _code_run(xt_n, c0, s0, s1, g.sub, u_n, *arrays, codes.numpy(), err_n)
            if s1 < c1:
                xt[s1:c1].addmm_(u[s0:s1, s1:c1].T, err[s0:s1], alpha=-1)
        blocks.append(g.pack(scales, codes.T.contiguous()))
        if c1 < cols:
            xt[c1:].addmm_(u[c0:c1, c1:].T, err[c0:c1], alpha=-1)
    return torch.cat(blocks, dim=-1), err.square_().sum(0)


def _lower_product_norms(e: Tensor, low: Tensor, limit: Tensor) -> Tensor:
    """|e L|² per row of e for lower-triangular L, a column block of L at a time from its diagonal down: the
    zeros above it are skipped, half the work of e @ L (and twice as fast as a triangular solve on 2 cores).

    The sum only grows, block by block, so a row stops once it passes its `limit` (its value then a partial sum
    above the limit: what a comparison with the limit needs). L's first columns carry most of it (the first 128
    of the output head's 1,536 held 52 % of |e L|² at Q3_K), so most rows stop after the costliest block.
    """
    out = e.new_zeros(e.shape[0])
    rows = torch.arange(e.shape[0], device=e.device)
    for k0 in range(0, e.shape[1], _BATCH):
        part = e[:, k0:] if rows.numel() == e.shape[0] else e[rows, k0:]
        out.index_add_(0, rows, (part @ low[k0:, k0 : k0 + _BATCH]).square_().sum(-1))
        rows = rows[out[rows] <= limit[rows]]
        if rows.numel() == 0:
            break
    return out


def _compensated(
    weight: Tensor,
    type_name: str,
    hessian: Tensor,
    importance: Tensor | None,
    damp: float,
    code: Callable[[Tensor, Grid, str, tuple[Tensor, Tensor, Tensor], Tensor], Tensor],
) -> QuantizedTensor:
    """What both compensated quantizers share: checks, H's factors (`_inverse_cholesky`), the importance, and
    code(rows, grid, type, factors, importance) -> their bytes, on each slice of rows (`for_each_slice`)."""
    g = grid(type_name)
    name = tensor_type(type_name).name
    if g is None:  # F32/F16, and the lattice types, which code 4 or 8 columns jointly: uncompensated
        return quantize(weight, name, hessian.diagonal() if importance is None else importance)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    factors = _inverse_cholesky(hessian, cols, damp, x.device)
    imp = importance_floor(hessian.diagonal() if importance is None else importance, cols, x.device)
    data = np.empty((rows, tensor_type(name).nbytes((1, cols))), np.uint8)

    def work(a: int, b: int) -> None:
        data[a:b] = code(x[a:b].to(torch.float32), g, name, factors, imp).cpu().numpy()

    for_each_slice(x.device, rows, _sweep_rows(x), work)
    return QuantizedTensor(type=name, shape=(rows, cols), data=data)


def quantize_compensated(
    weight: Tensor,
    type_name: str,
    hessian: Tensor,
    importance: Tensor | None = None,
    damp: float = DAMP,
) -> QuantizedTensor:
    """Quantize a 2-D weight (out, in) to GGUF type `type_name`, spreading each column's error onto the
    columns not yet coded through `hessian` (in, in), the inputs' E[x x^T] (any positive multiple will do).

    `importance` (in,) weights the scale search as in `quantize`; by default diag(hessian), the
    inputs' mean squares. F32 and F16 have no grid and are written as `quantize` writes them; the lattice types
    (IQ3_S .. IQ2_XXS) code 4 or 8 columns jointly, not one at a time, and are written as `quantize` writes them
    with that importance, uncompensated. Runs on the weight's device; the bytes come back to host memory.
    """

    def code(x: Tensor, g: Grid, name: str, factors: tuple[Tensor, Tensor, Tensor], imp: Tensor) -> Tensor:
        return _sweep(g, x, factors[0], imp)[0]

    return _compensated(weight, type_name, hessian, importance, damp, code)


def quantize_compensated_no_worse(
    weight: Tensor,
    type_name: str,
    hessian: Tensor,
    importance: Tensor,
    damp: float = DAMP,
    min_error: float = 0.0,
) -> QuantizedTensor:
    """`quantize_compensated`, each row then the better, by its output error (w - ŵ) H (w - ŵ)ᵀ, of that and
    `quantize_no_worse`'s row: a weight already on the type's grid comes back exactly, and no row errs
    more than without compensation. Rows are coded independently, so any mix of the two is a valid tensor.
    Inputs calibration never saw (zero diagonal of H) count nothing.

    Runs on the weight's device a slice of rows at a time (`for_each_slice`); only the bytes come back
    to host memory. A slice whose `quantize_no_worse` encoding errs less than `min_error` relative to the
    weights, both by diag(H) (sum_j H_jj e_j² over sum_j H_jj w_j²), keeps that encoding uncompensated.
    """
    h_diag = hessian.detach().diagonal()

    def code(x: Tensor, g: Grid, name: str, factors: tuple[Tensor, Tensor, Tensor], imp: Tensor) -> Tensor:
        u, low, added = factors
        plain, plain_values = no_worse_rows(x, name, imp)
        e = plain_values.sub_(x)
        d = h_diag.to(x.device, torch.float32)
        if float(e.square().mv(d).sum()) < min_error * float(x.square().mv(d).sum()):
            return plain
        comp, comp_err = _sweep(g, x, u, imp)
        # Both errors by the damped H, less what damping added to its diagonal: e H eᵀ. The compensated one
        # comes with the sweep; the plain one is |e L|², L lower-triangular, worked out as far as the choice needs.
        comp_err -= decode_rows(comp, name, x.shape[1]).sub_(x).square_().mv(added)
        plain_added = e.square().mv(added)
        plain_err = _lower_product_norms(e, low, comp_err + plain_added) - plain_added
        return torch.where((comp_err < plain_err).unsqueeze(-1), comp, plain)

    return _compensated(weight, type_name, hessian, importance, damp, code)
