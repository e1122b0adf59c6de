"""Where a plan's bits went: blocks x linears, each cell the bits per original weight it deploys.

A cell's bits count every byte the linear deploys (all factors of a decomposition, the rows pruning kept)
over the weights of the unpruned matrix, so pruning and decomposition show as fewer bits, as they cost.
Its label says the form: the GGUF type, `svd`/`kron` with the factors' size, the share of units pruning
kept, or `removed` where pruning dropped the whole sublayer.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from autosquash.compress.operators import PRUNING, deploy_linear
from autosquash.compress.plan import SUBLAYERS, Plan
from autosquash.files import atomic_path, write_text
from autosquash.models.arch import Arch

# Columns: the block's linears in the order a forward pass meets them.
LINEARS: tuple[tuple[str, str], ...] = tuple((kind, name) for kind, linears in SUBLAYERS for name, _ in linears)
SHORT = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up"}
SHORT["ffn_down"] = "down"


@dataclass(frozen=True)
class Cell:
    """One linear of one block as a plan deploys it."""

    block: int
    linear: str  # GGUF short name, e.g. attn_q
    bits_per_weight: float  # 0 where the sublayer is removed
    form: str  # quant, svd, kron, ... (the operator's name); "removed"
    types: tuple[str, ...]  # GGUF types of its tensors, once each, the type holding the most bytes first
    kept: float  # share of the sublayer's units pruning kept (1.0 unpruned, 0.0 removed)

    @property
    def label(self) -> str:
        if self.form == "removed":
            return "removed"
        # A decomposition is named by its bulk's type (its index and scale vectors are small F32/I16 tensors).
        text = "/".join(self.types) if self.form == "quant" else f"{self.form} {self.types[0]}"
        return text if self.kept >= 1.0 else f"{text} keep {self.kept:.0%}"


def layer_cells(arch: Arch, plan: Plan) -> list[list[Cell]]:
    """Rows of cells, one row per block, columns as LINEARS."""
    rows = []
    for i in range(arch.n_layers):
        row = []
        for kind, name in LINEARS:
            op, choice = PRUNING[kind], plan.choice(f"blk.{i}.{kind}")
            full_out, full_in = op.shapes(arch, op.full(arch))[name]
            kept = op.kept(arch, choice)
            if kept == 0:
                row.append(Cell(i, name, 0.0, "removed", (), 0.0))
                continue
            out_f, in_f = op.shapes(arch, kept)[name]
            deploy = deploy_linear(f"blk.{i}.{name}", out_f, in_f, choice)
            nbytes = sum(t.nbytes for t in deploy.tensors)
            types = tuple(dict.fromkeys(t.type for t in sorted(deploy.tensors, key=lambda t: -t.nbytes)))
            row.append(Cell(i, name, 8 * nbytes / (full_out * full_in), deploy.form.name, types, kept / op.full(arch)))
        rows.append(row)
    return rows


def _matrix(cells: list[list[Cell]]) -> list[list[float]]:
    return [[c.bits_per_weight for c in row] for row in cells]


def layer_map_png(arch: Arch, plan: Plan, title: str, path: Path) -> None:
    """The heatmap as a PNG: colour by bits per weight, each cell labelled with its form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = layer_cells(arch, plan)
    values = _matrix(cells)
    top = max(8.5, max(max(r) for r in values))  # Q8_0's 8.5 bits at the bright end unless F16 is there
    fig, ax = plt.subplots(figsize=(9, max(3.0, 1.2 + 0.32 * len(cells))), dpi=110)
    im = ax.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=top)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            shade = c.bits_per_weight / top
            ax.text(j, i, c.label, ha="center", va="center", fontsize=6, color="black" if shade > 0.55 else "white")
            if c.kept < 1.0:  # pruned or removed: hatched so it reads without the label
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", ec="cyan", lw=0))
    ax.set_xticks(range(len(LINEARS)), [SHORT[n] for _, n in LINEARS])
    ax.set_yticks(range(len(cells)), [f"blk {i}" for i in range(len(cells))], fontsize=7)
    ax.xaxis.tick_top()
    fig.colorbar(im, ax=ax, label="bits per original weight")
    ax.set_title(title, fontsize=9, pad=18)
    with atomic_path(path) as tmp:  # written whole, as every output file
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)


def layer_map_html(arch: Arch, plan: Plan, title: str, path: Path) -> None:
    """The heatmap as interactive HTML (plotly, self-contained): hover shows each cell's form and bits."""
    import plotly.graph_objects as go

    cells = layer_cells(arch, plan)
    text = [[f"blk {c.block} {c.linear}<br>{c.label}<br>{c.bits_per_weight:.2f} bits/weight" for c in r] for r in cells]
    fig = go.Figure(
        go.Heatmap(
            z=_matrix(cells),
            x=[SHORT[n] for _, n in LINEARS],
            y=[f"blk {i}" for i in range(len(cells))],
            text=[[c.label for c in r] for r in cells],
            texttemplate="%{text}",
            hovertext=text,
            hoverinfo="text",
            colorscale="Magma",
            zmin=0.0,
            colorbar={"title": "bits/weight"},
        )
    )
    fig.update_layout(title=html.escape(title), yaxis={"autorange": "reversed"}, template="plotly_white")
    write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))  # written whole
