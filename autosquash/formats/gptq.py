"""Quantization with error compensation inside the GGUF grids, as GPTQ does (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

A linear's weight W (out, in) is coded one input column at a time, left to right. After column j is coded,
its error is spread onto the columns not yet coded so that the layer's output error on the calibration
inputs, tr((W - Ŵ) H (W - Ŵ)^T) with H = E[x x^T], stays as low as it can: with U the upper Cholesky
factor of H^-1, W[:, j+1:] -= (W[:, j] - Ŵ[:, j]) / U[j, j] * U[j, j+1:]. The stored bytes are the type's
GGUF blocks, unchanged: when the sweep reaches a block (32 values, or a K-quant super-block of 256), its
scales are chosen from the error-updated weights of that block by the same importance-weighted search as
`codecs.quantize` (codecs.Grid), and its values are then coded against those scales column by column.
Columns are updated lazily (GPTQ's lazy batches): one by one within a run of 32, the rest of a batch of 128
(or of a super-block) by one matrix product per run, the columns beyond the batch by one per batch.

With a diagonal H nothing is spread and the bytes are exactly `quantize(W, type, diag(H))`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autosquash.errors import AutosquashError
from autosquash.formats.codecs import (
    Grid,
    QuantizedTensor,
    Scales,
    checked_weight,
    chunk_rows,
    dequantize,
    grid,
    importance_floor,
    quantize,
    quantize_no_worse,
    search_weights,
)
from autosquash.formats.gguf_types import tensor_type

_LAZY = 32  # columns updated one by one at a time, the rest of their batch by one matrix product per 32
_BATCH = 128  # columns (or one K-quant super-block) coded before the columns after them are updated
_ERROR_CHUNK_VALUES = 1 << 21  # weights per slice compared: a matrix product of 1,024 rows at 2,048 inputs
DAMP = 0.01  # dampening added to H's diagonal, as a share of its mean diagonal (GPTQ's default)


def _inverse_cholesky(hessian: Tensor, cols: int, damp: float, device: torch.device) -> Tensor:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float32 on `device`.

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
        damped = h + (damp * 10**attempt * mean) * torch.eye(cols, dtype=h.dtype, device=device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u.to(torch.float32)
    raise AutosquashError("hessian is not positive semi-definite (its damped Cholesky failed)")


def _scales(g: Grid, x: Tensor, w: Tensor) -> Scales:
    """`g.scales` of rows x (rows, block), a slice of rows at a time as `codecs.quantize` searches them (the
    search's temporaries are a few dozen candidates times its input: a whole table's column at once spills
    out of the CPU's caches, about twice as slow)."""
    step = chunk_rows(x.device, g.block)
    if step >= x.shape[0]:
        return g.scales(x, w)
    parts = [g.scales(x[a : a + step], w[a : a + step]) for a in range(0, x.shape[0], step)]
    return tuple(torch.cat(fields) for fields in zip(*parts, strict=True))


def quantize_compensated(
    weight: Tensor,
    type_name: str,
    hessian: Tensor,
    importance: Tensor | None = None,
    damp: float = DAMP,
) -> QuantizedTensor:
    """Quantize a 2-D weight (out, in) to GGUF type `type_name`, spreading each column's error onto the
    columns not yet coded through `hessian` (in, in), the inputs' E[x x^T] (any positive multiple will do).

    `importance` (in,) weights the scale search as in `codecs.quantize`; by default diag(hessian), the
    inputs' mean squares. F32 and F16 have no grid and are written as `quantize` writes them; the lattice types
    (IQ3_S .. IQ2_XXS) code 4 or 8 columns jointly, not one at a time, and are written as `quantize` writes them
    with that importance, uncompensated. Runs on the weight's device; the bytes come back to host memory.
    """
    g = grid(type_name)
    name = tensor_type(type_name).name
    if g is None:
        return quantize(weight, name, hessian.diagonal() if importance is None else importance)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    u = _inverse_cholesky(hessian, cols, damp, x.device)
    imp = importance_floor(hessian.diagonal() if importance is None else importance, cols, x.device)
    row_mean_sq = x.square().mean(-1, keepdim=True)
    # Worked on transposed, one input column per (contiguous) row, so that coding a column and the rank-one
    # update of those after it read and write whole rows of memory.
    xt = x.T.contiguous()
    err = torch.empty_like(xt)  # each column's error, scaled by 1 / U[j, j]
    batch = max(g.block, _BATCH)
    blocks = []
    for b0 in range(0, cols, batch):
        b1 = min(b0 + batch, cols)
        for c0 in range(b0, b1, g.block):
            c1 = c0 + g.block
            xb = xt[c0:c1].T.contiguous()
            scales = _scales(g, xb, search_weights(imp[c0:c1], row_mean_sq, xb))
            step, offset = (None if a is None else a.T.contiguous() for a in g.affine(scales))
            codes = torch.empty_like(xt[c0:c1])
            for s0 in range(c0, c1, _LAZY):
                s1 = min(s0 + _LAZY, c1)
                for j in range(s0, s1):
                    k = (j - c0) // g.sub
                    col = xt[j].unsqueeze(-1)
                    s, o = step[k].unsqueeze(-1), None if offset is None else offset[k].unsqueeze(-1)
                    q = g.codes(col, s, o)
                    codes[j - c0] = q.squeeze(-1)
                    e = (col - g.values(q, s, o)).squeeze(-1) / u[j, j]
                    err[j] = e
                    if j + 1 < s1:
                        xt[j + 1 : s1].addr_(u[j, j + 1 : s1], e, alpha=-1)
                if s1 < b1:
                    xt[s1:b1].addmm_(u[s0:s1, s1:b1].T, err[s0:s1], alpha=-1)
            blocks.append(g.pack(scales, codes.T.contiguous()))
        if b1 < cols:
            xt[b1:].addmm_(u[b0:b1, b1:].T, err[b0:b1], alpha=-1)
    data = torch.cat(blocks, dim=-1).cpu().numpy()
    return QuantizedTensor(type=name, shape=(rows, cols), data=data)


def quantize_compensated_no_worse(
    weight: Tensor, type_name: str, hessian: Tensor, importance: Tensor, damp: float = DAMP
) -> QuantizedTensor:
    """`quantize_compensated`, each row then the better, by its output error (w - ŵ) H (w - ŵ)ᵀ, of that and
    `codecs.quantize_no_worse`'s row: a weight already on the type's grid comes back exactly, and no row errs
    more than without compensation. Rows are coded independently, so any mix of the two is a valid tensor.
    Compared a slice of rows at a time in host memory."""
    plain = quantize_no_worse(weight, type_name, importance)
    comp = quantize_compensated(weight, type_name, hessian, importance, damp)
    rows, cols = comp.shape
    h = hessian.detach().to("cpu", torch.float32)
    data = plain.data.copy()
    step = max(1, _ERROR_CHUNK_VALUES // cols)
    for a in range(0, rows, step):
        x = weight[a : a + step].detach().to("cpu", torch.float32)

        def errors(q: QuantizedTensor, a=a, x=x) -> Tensor:
            e = dequantize(QuantizedTensor(q.type, (x.shape[0], cols), q.data[a : a + x.shape[0]])) - x
            return ((e @ h) * e).sum(-1)

        better = (errors(comp) < errors(plain)).numpy()
        data[a : a + x.shape[0]][better] = comp.data[a : a + x.shape[0]][better]
    return QuantizedTensor(type=comp.type, shape=comp.shape, data=data)
