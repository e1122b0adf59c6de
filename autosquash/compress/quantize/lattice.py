"""The encoder of ggml's lattice types IQ3_S .. IQ2_XXS (their format: autosquash.formats.iq_lattice): for
super-blocks of values and their search weights, the fields the format stores, chosen for the lowest weighted
squared error.

It follows the idea of ggml-quants.c's quantize_row_iq2_xxs_impl and its siblings (the layout is theirs,
the implementation our own, vectorised over super-blocks in torch):
1. signs are those of x; where a sign byte has only 7 bits and a group of 8 an odd count of negative values, the
   one with the least w x^2 is coded with the wrong sign;
2. per sub-block, a few candidate steps each project every group onto the grid (below) and refit the step by
   weighted least squares; the best fit is projected and refitted once more;
3. the sub-block steps are quantized to d * unit * (1, 3, .., 31) by a weighted least-squares search for d;
4. every group is projected once more against the step the block stores (ggml keeps the points it chose for
   the unquantized steps).
Projection: the level nearest each coordinate gives a point of the full product of levels; ggml's grid holds a
quarter to a half of the ones met in practice. The 8 grid points nearest that point (a table built once) are scored
by the weighted squared error and the best taken: exact for a point on the grid, and 0.5-1 % above the exhaustive
search's error on heavy-tailed values (ggml searches a similar neighbour list, unweighted distances 1 and 2 away).
Weights: with importance, llama.cpp's for these types (`lattice_weights`); without, its defaults, x^2 for
IQ3 (quantize_row_iq3_xxs_ref) and 0.25 sigma^2 + x^2 for IQ2 (quantize_row_iq2_s_ref; llama.cpp refuses IQ2_XXS
and IQ2_XS without an imatrix, and they take IQ2_S's default here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from autosquash.formats.iq_lattice import (
    IQ2_S,
    IQ2_XS,
    IQ2_XXS,
    IQ3_S,
    IQ3_XXS,
    QK_K,
    Lattice,
    lattice_grid,
    lattice_step,
    pack_iq2_s,
    pack_iq2_xs,
    pack_iq2_xxs,
    pack_iq3_s,
    pack_iq3_xxs,
)

# Grid points scored per group: 8 for the codes stored, 4 while searching steps (0.3-0.8 % more error than 8
# throughout, 25 % faster). At most 8: the argmin below packs a candidate's number in 3 bits.
_NEIGHBOURS = 8
_SEARCH_NEIGHBOURS = 4
# Candidate steps: a sub-block's largest value mapped to these fractions of the grid's largest level, then each
# refit. On Student-t(5) rows and Qwen2.5's ffn_down (benchmarks/iq_lattice.py's data) three cost 0-1.4 % more
# error than seven from 0.8 to 1.2 at under half the time; without the one beyond the top level (clipping the
# largest value) IQ2 lost 1-3 %.
_STEP_RATIOS = (0.9, 1.05, 1.2)
# Candidate d: the largest sub-block step mapped to these odd levels (1 .. 31), then refit twice.
_D_LEVELS = (27.0, 29.0, 31.0, 33.0)
_D_REFINE = 2


# ---------------------------------------------------------------------------------------------------------
# Tables: the grid (formats.iq_lattice), the nearest-level lookup and every level combination's nearest grid points


@dataclass(frozen=True)
class _Tables:
    grid: Tensor  # (J, D) the grid's magnitudes, float32 as gguf.quants decodes them
    grid_t: Tensor  # (D, J) the same, one row per coordinate
    top: float  # the largest level
    cell_key: Tensor  # (D, C) int32: L^i times the level nearest half-unit cell c (v in [c/2, (c+1)/2))
    cell_value: Tensor  # (C,) the level nearest half-unit cell c
    neighbour: Tensor  # (K * L^D,) int32: grid index of neighbour k of level combination u at k * L^D + u
    neighbour_value: Tensor  # (D, K, L^D): coordinate i of that neighbour


@functools.cache
def _tables(name: str, device: torch.device) -> _Tables:
    """The tables of lattice type `name` on `device` (built once per process and device, in well under a second)."""
    cpu = torch.device("cpu")
    grid = lattice_grid(name, cpu)
    levels = torch.unique(grid)
    n_levels, dim = len(levels), grid.shape[1]
    size = n_levels**dim
    powers = n_levels ** torch.arange(dim, device=cpu)
    # Every level combination u = sum l_i L^i, its nearest grid points by Euclidean distance.
    combos = levels[(torch.arange(size, device=cpu).unsqueeze(-1) // powers) % n_levels]
    neighbours = torch.cdist(combos, grid).topk(_NEIGHBOURS, largest=False).indices.T  # (K, size)
    # The levels' midpoints all sit on half units (16.5, 57, ...), so the half-unit cell of v says its level.
    mids = (levels[1:] + levels[:-1]) / 2
    cells = int(2 * mids[-1]) + 2
    cell_level = torch.bucketize((torch.arange(cells, device=cpu) + 0.5) / 2, mids)
    return _Tables(
        grid=grid.to(device),
        grid_t=grid.T.contiguous().to(device),
        top=float(levels[-1]),
        cell_key=(powers.unsqueeze(1) * cell_level).to(device, torch.int32),
        cell_value=levels[cell_level].to(device),
        neighbour=neighbours.reshape(-1).to(device, torch.int32),
        neighbour_value=grid.T[:, neighbours].contiguous().to(device),
    )


def _cells(v: Tensor, tab: _Tables) -> Tensor:
    """Half-unit cells of v (in grid units), clamped to the table: negative values take the lowest level."""
    return v.mul(2).clamp_(0, tab.cell_value.shape[0] - 1).to(torch.int32)


def _argmin0(err: Tensor) -> Tensor:
    """argmin over the first axis (at most 8 long) of non-negative float32 values, as int32.

    torch's argmin over a short leading axis is ~50x slower than an integer min on CPU; non-negative floats order
    as their int32 bits, so the candidate's number goes in the 3 low mantissa bits (a relative change of 1e-6).
    """
    k = torch.arange(err.shape[0], dtype=torch.int32, device=err.device).view(-1, *[1] * (err.ndim - 1))
    return err.view(torch.int32).bitwise_and(~7).bitwise_or_(k).amin(0).bitwise_and_(7)


def _project(t: Tensor, w: Tensor, tab: _Tables, k: int = _NEIGHBOURS) -> tuple[Tensor, Tensor]:
    """Grid index (P,) and grid point (D, P) nearest each column of t (D, P), in grid units, under weights w."""
    dim = t.shape[0]
    cells = _cells(t, tab)
    key = tab.cell_key[0].index_select(0, cells[0])
    for i in range(1, dim):
        key += tab.cell_key[i].index_select(0, cells[i])
    err = None
    for i in range(dim):
        e = tab.neighbour_value[i, :k].index_select(1, key).sub_(t[i]).square_().mul_(w[i])
        err = e if err is None else err.add_(e)
    size = tab.neighbour.shape[0] // _NEIGHBOURS
    index = tab.neighbour.index_select(0, _argmin0(err).mul_(size).add_(key))
    return index, tab.grid_t.index_select(1, index)


# ---------------------------------------------------------------------------------------------------------
# The encoder, on one layout throughout: (D, sub-blocks, groups per sub-block, super-blocks), so that a group's
# coordinates are D rows of contiguous super-block columns and a sub-block's sums reduce over leading axes.


def _signs(x: Tensor, w: Tensor, parity: bool) -> Tensor:
    """Which values of x (256, N) are coded negative: those of x, and with `parity` the least w x^2 of a run of 8
    with an odd count of them flipped (the sign byte's eighth bit is the parity of its seven)."""
    neg = x < 0
    if not parity:
        return neg
    neg8 = neg.view(32, 8, -1)
    odd = neg8.sum(1, dtype=torch.int32).bitwise_and_(1).bool()
    least = _argmin0((w * x * x).view(32, 8, -1).transpose(0, 1).contiguous())
    flip = torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1) == least.unsqueeze(1)
    return (neg8 ^ (flip & odd.unsqueeze(1))).view(neg.shape)


def _lsq(xs: Tensor, ws: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted least-squares step per sub-block for grid points g, its error reduction sum(wxg)^2 / sum(wg^2) and
    sum(w g^2) (what an error in the step costs); inputs (D, nsub, gps, N), outputs (nsub, N)."""
    wg = ws * g
    sxg = (wg * xs).sum(0).sum(1)
    sgg = wg.mul_(g).sum(0).sum(1)
    ok = sgg > 0
    step = torch.where(ok, sxg / torch.where(ok, sgg, 1.0), 0.0)
    return step, step * sxg, sgg


def _inverse(v: Tensor) -> Tensor:
    """1 / v where v > 0, else 0 (a zero step maps every value to the grid's lowest point, decoded as 0 * it)."""
    pos = v > 0
    return torch.where(pos, 1.0 / torch.where(pos, v, 1.0), 0.0)


def _better(new: tuple[Tensor, ...], old: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per sub-block, whichever fit (step, gain, ...) has the larger gain."""
    better = new[1] > old[1]
    return tuple(torch.where(better, a, b) for a, b in zip(new, old, strict=True))


def _sub_steps(xs: Tensor, ws: Tensor, tab: _Tables) -> tuple[Tensor, Tensor]:
    """Per sub-block float step and sum(w g^2) at it, (nsub, N), for values xs (D, nsub, gps, N)."""
    dim = xs.shape[0]
    inv_max = _inverse(xs.amax(0).amax(1)).unsqueeze(1)

    def fit(inv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, g = _project((xs * inv).view(dim, -1), ws.view(dim, -1), tab, _SEARCH_NEIGHBOURS)
        return _lsq(xs, ws, g.view(xs.shape))

    best = fit(inv_max * (tab.top * _STEP_RATIOS[0]))
    for ratio in _STEP_RATIOS[1:]:
        best = _better(fit(inv_max * (tab.top * ratio)), best)
    step, _, weight = _better(fit(_inverse(best[0]).unsqueeze(1)), best)  # one assign/refit round from the best
    return step.clamp(min=0.0), weight


def _odd_levels(v: Tensor) -> Tensor:
    """The odd level 1 .. 31 nearest each v."""
    return v.sub(1).div_(2).round_().mul_(2).add_(1).clamp_(1, 31)


def _super_scale(steps: Tensor, weight: Tensor) -> Tensor:
    """Per super-block D minimising sum weight (step - D o)^2 over odd levels o: steps, weight (nsub, N) -> (N,)."""

    def fit(inv: Tensor) -> tuple[Tensor, Tensor]:
        o = _odd_levels(steps * inv)
        wo = weight * o
        sxo, soo = (wo * steps).sum(0), wo.mul_(o).sum(0)
        ok = soo > 0
        d = torch.where(ok, sxo / torch.where(ok, soo, 1.0), 0.0)
        return d, d * sxo

    inv_max = _inverse(steps.amax(0))
    best = fit(inv_max * _D_LEVELS[0])
    for level in _D_LEVELS[1:]:
        best = _better(fit(inv_max * level), best)
    for _ in range(_D_REFINE):
        best = _better(fit(_inverse(best[0])), best)
    return best[0]


def _default_weights(x: Tensor, lat: Lattice) -> Tensor:
    """llama.cpp's weights without an imatrix: x^2 for IQ3, 0.25 sigma^2 + x^2 for IQ2 (sigma^2 as below)."""
    if lat.group == 4:
        return x.square()
    return x.square().mean(-1, keepdim=True).mul_(0.5) + x.square()


def lattice_weights(name: str, importance: Tensor, x: Tensor) -> Tensor:
    """Search weights of rows x (rows, k * 256) whose columns have `importance` (k * 256,), as llama.cpp forms them
    for these types: importance * sqrt(sigma^2 + x^2), sigma^2 the super-block's mean square, twice that for IQ2_S
    and IQ3 (quantize_row_iq2_xxs_impl .. quantize_row_iq3_s_impl). Against the row's mean square, which the other
    codecs use, this lowered the weighted error by 1.3-2.4 % (IQ2_XS, IQ2_XXS: 0.1-0.4 %), and with one value 200
    times the others' spread in a row it took IQ2_S from 1.8x ggml's error on that matrix to 1.03x."""
    xb = x.view(x.shape[0], -1, QK_K)
    factor = 1.0 if name in ("IQ2_XXS", "IQ2_XS") else 2.0
    sigma2 = xb.square().mean(-1, keepdim=True).mul_(factor)
    return (importance.view(-1, QK_K) * (sigma2 + xb.square()).sqrt()).view(x.shape)


def _encode(x: Tensor, w: Tensor | None, lat: Lattice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Super-blocks x (N, 256) -> f16 d (N,) as float32, sub-block codes s (N, nsub), grid indices (N, groups) and
    signs (N, 256) bool."""
    tab = _tables(lat.name, x.device)
    n, dim = x.shape[0], lat.group
    w = (_default_weights(x, lat) if w is None else w).T.contiguous()
    x = x.T.contiguous()
    neg = _signs(x, w, lat.parity)

    def columns(v: Tensor) -> Tensor:
        return v.view(QK_K // lat.sub, lat.sub // dim, dim, n).permute(2, 0, 1, 3).contiguous()

    xs, ws = columns(torch.where(neg, -x, x)), columns(w)
    steps, weight = _sub_steps(xs, ws, tab)
    d = (_super_scale(steps, weight) / lat.unit).to(torch.float16).to(torch.float32)
    s = (steps * _inverse(d * lat.unit)).sub_(1).div_(2).round_().clamp_(0, 15)
    index, _ = _project((xs * _inverse(lattice_step(d, s, lat)).unsqueeze(1)).view(dim, -1), ws.view(dim, -1), tab)
    return d, s.T, index.view(-1, n).T, neg.T


def _encoder(lat: Lattice, pack: Callable[..., Tensor]) -> Callable[[Tensor, Tensor | None], Tensor]:
    def encode(x: Tensor, w: Tensor | None) -> Tensor:
        return pack(*_encode(x, w, lat))

    return encode


# name -> encoder: super-blocks (N, 256) and weights or None -> bytes (N, block bytes)
LATTICE_ENCODERS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "IQ3_S": _encoder(IQ3_S, pack_iq3_s),
    "IQ3_XXS": _encoder(IQ3_XXS, pack_iq3_xxs),
    "IQ2_S": _encoder(IQ2_S, pack_iq2_s),
    "IQ2_XS": _encoder(IQ2_XS, pack_iq2_xs),
    "IQ2_XXS": _encoder(IQ2_XXS, pack_iq2_xxs),
}
