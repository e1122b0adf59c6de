"""Quantization of weight matrices to GGUF tensor types, producing exactly the bytes a GGUF file holds
(formats.codecs lays them out and decodes them).

Without `importance`, the legacy and ternary types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, TQ2_0, TQ1_0) reproduce
llama.cpp's reference quantizers byte for byte (what `gguf.quants.quantize` writes), and the K-quants run a
least-squares scale/min search with llama.cpp's default weights (ideas of make_qx_quants / make_qkx2_quants in
ggml-quants.c). With `importance` (per input channel, e.g. the mean squared activation) every quantized type
searches its scales for the lowest importance-weighted squared error, as llama.cpp does with an imatrix. The
non-linear IQ4_NL/IQ4_XS (gguf.quants reads them but writes neither) search their scales the same way over
ggml's 16-level grid, weighting by x^2 without importance as llama.cpp's quantize_iq4_nl does; the lattice types
IQ3_S .. IQ2_XXS search each group's grid point (lattice). Everything is vectorized over blocks in torch; rows go
through in cache-sized chunks. On a CPU the scale searches over integer codes run compiled (kernels), a
sub-block at a time.

The modules: scales (the scale searches), kernels (their compiled CPU loops), encoders (each type's `Grid` and
encoder, ggml's reference quantizers), lattice (the lattice types' encoder); here, the quantizers of whole
weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from autosquash.compress.quantize.encoders import ENCODERS, GRIDS, Encoder, Grid, grid
from autosquash.compress.quantize.lattice import LATTICE_ENCODERS, lattice_weights
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import (
    QuantizedTensor,
    compiled,
    decode_rows,
    dequantize,
    quantizable_type,
)
from autosquash.formats.gguf_types import tensor_type
from autosquash.formats.slices import for_each_slice

__all__ = [
    "Grid",
    "checked_weight",
    "chunk_rows",
    "fake_quantize",
    "grid",
    "importance_floor",
    "no_worse_rows",
    "quantize",
    "quantize_no_worse",
    "search_weights",
]


# Values quantized per step: big enough to amortize the ~500 small torch calls per step, small enough that
# the search's temporaries stay in cache (measured on 2 cores: 2^17 is 2-3x faster than 2^13 or 2^20).
# On a GPU each call is a kernel launch and there is no cache to stay in: steps as big as memory allows.
_CHUNK_VALUES = 1 << 17
_CHUNK_VALUES_GPU = 1 << 22  # ~0.2 GB per candidate-sized temporary


def _encoder(type_name: str) -> tuple[str, Encoder]:
    """The canonical name of a quantizable type and its encoder."""
    name = quantizable_type(type_name)
    return name, ENCODERS[name]


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


def quantize(weight: Tensor, type_name: str, importance: Tensor | None = None) -> QuantizedTensor:
    """Quantize a 2-D weight (rows along the last dim) to GGUF type `type_name` (ggml-common.h layouts).

    `importance` (shape (in,)) weights the scale search per input channel as llama.cpp's imatrix does.
    The search runs on the weight's device (a GPU's blocks search in a few large steps, a CPU's slices
    `for_each_slice`); the bytes come back to host memory.
    """
    name, encode = _encoder(type_name)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    t = tensor_type(name)
    imp = None if importance is None else importance_floor(importance, cols, x.device)
    data = np.empty((rows, t.nbytes((1, cols))), np.uint8)

    def work(a: int, b: int) -> None:
        xr = x[a:b].to(torch.float32).contiguous()
        if imp is None:
            w = None
        elif name in LATTICE_ENCODERS:  # llama.cpp weights these by each super-block's mean square, not the row's
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
        scales, codes = g.fit(xb, weights)
        values = g.values(codes, *g.affine(scales))
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
    name, encode = _encoder(type_name)
    g, block = GRIDS[name], tensor_type(name).block_size
    if g.compiled_no_worse is not None and compiled(x):
        return g.compiled_no_worse(x, search_weights(imp, x.square().mean(-1, keepdim=True), x), imp)
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
        values, plain_values = decode_rows(weighted, name, block), decode_rows(plain, name, block)
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
    if name not in GRIDS:
        return quantize(weight, name)
    x = checked_weight(weight, name)
    rows, cols = x.shape
    imp = importance_floor(importance, cols, x.device)
    data = np.empty((rows, tensor_type(name).nbytes((1, cols))), np.uint8)

    def work(a: int, b: int) -> None:
        data[a:b] = no_worse_rows(x[a:b].to(torch.float32), name, imp)[0].cpu().numpy()

    for_each_slice(x.device, rows, chunk_rows(x.device, cols), work)
    return QuantizedTensor(type=name, shape=(rows, cols), data=data)


def fake_quantize(weight: Tensor, type_name: str, importance: Tensor | None = None) -> Tensor:
    """The float32 weights a GGUF file of this type holds: dequantize(quantize(weight, type_name, importance))."""
    return dequantize(quantize(weight, type_name, importance))
