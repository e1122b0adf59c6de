"""Plots of a search: quality against weights MB and against peak memory, energy as colour.

Each view draws as its line the plans no other plan beats in that view (smaller and no worse, or no larger
and better), among the plans that fit the phone; every other plan is a point. The uniform baselines are
squares, the search's Pareto front (all its objectives at once) is ringed in red, and the phone's memory
limit is drawn in the peak-memory view when it is in range. Another tool's files scored the same way (llama.cpp's
recipes, from `benchmarks/vs_llamacpp.py`: the search's peers.csv) are triangles, named.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from autosquash.files import atomic_path, write_text

if TYPE_CHECKING:
    import plotly.graph_objects as go

BASELINE, SEARCHED = "baseline", "searched"  # searched: every origin but the seeded uniform baselines
# (column, axis title) of each 2-D view
VIEWS = (("weights_mb", "weights (MB)"), ("memory_mb", "peak memory on the phone (MB)"))


def _fits(row: dict) -> bool:
    v = row.get("fits", True)
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1", "")  # csv rows hold strings


def _completed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("state", "COMPLETE") == "COMPLETE"]


def pareto_2d(rows: list[dict], x: str, y: str) -> list[dict]:
    """The rows that fit and that no other fitting row beats on (x, y) both minimised, by x ascending."""
    pts = sorted((r for r in _completed(rows) if _fits(r)), key=lambda r: (float(r[x]), float(r[y])))
    out, best = [], float("inf")
    for r in pts:
        if float(r[y]) < best:
            out.append(r)
            best = float(r[y])
    return out


def front_png(
    rows: list[dict],
    front: list[dict],
    quality: str,
    limit_mb: float,
    title: str,
    path: Path,
    peers: Sequence[dict] = (),
) -> None:
    """Static plot (PNG) for the MLflow run page: the two views side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _completed(rows)
    front_ids = {str(r["trial"]) for r in front}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110, sharey=True)
    if done:
        energy = [float(r["energy_mj_per_token"]) for r in done]
        lo, hi = min(energy), max(energy)
    for ax, (x, xlabel) in zip(axes, VIEWS, strict=True):
        sc = None
        for origin, marker, size in ((SEARCHED, "o", 30), (BASELINE, "s", 60)):
            sel = [r for r in done if (r["origin"] == BASELINE) == (origin == BASELINE)]
            if sel:
                sc = ax.scatter(
                    [float(r[x]) for r in sel],
                    [float(r[quality]) for r in sel],
                    c=[float(r["energy_mj_per_token"]) for r in sel],
                    marker=marker,
                    s=size,
                    cmap="viridis",
                    vmin=lo,
                    vmax=hi,
                    edgecolors=["red" if str(r["trial"]) in front_ids else "k" for r in sel],
                    linewidths=[1.6 if str(r["trial"]) in front_ids else 0.4 for r in sel],
                    label=f"{origin} plans",
                )
        if peers:
            px, py = [float(r[x]) for r in peers], [float(r[quality]) for r in peers]
            ax.scatter(px, py, marker="^", s=55, facecolors="none", edgecolors="darkorange", label="llama.cpp recipes")
            for r, xi, yi in zip(peers, px, py, strict=True):
                ax.annotate(r["name"], (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=6, c="darkorange")
        line = pareto_2d(done, x, quality)
        if line:
            ax.plot([float(r[x]) for r in line], [float(r[quality]) for r in line], "r-", lw=1.2, label="best here")
        if x == "memory_mb" and done:
            _limit(ax, limit_mb, max(float(r[x]) for r in done))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel(quality)
    if done and sc is not None:
        fig.colorbar(sc, ax=axes, label="energy (mJ/token)")
    fig.suptitle(f"{title}  (red rings: the search's Pareto front)", fontsize=10)
    with atomic_path(path) as tmp:  # written whole, as every output file
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)


def _limit(ax, limit_mb: float, top: float) -> None:
    if limit_mb <= 1.5 * top:
        ax.axvline(limit_mb, color="crimson", ls="--", label=f"app memory limit ({limit_mb:.0f} MB)")
    else:
        ax.text(
            0.99,
            0.01,
            f"app memory limit {limit_mb:.0f} MB: off the right edge",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="crimson",
        )


def _html_plan_traces(done: list[dict], front_ids: set[str], x: str, quality: str, legend: bool) -> list[go.Scatter]:
    """The searched and the baseline plans of view `x` as marker traces: energy as colour, the front ringed in red,
    each plan's numbers and file on hover."""
    import plotly.graph_objects as go

    traces = []
    for origin, symbol in ((SEARCHED, "circle"), (BASELINE, "square")):
        sel = [r for r in done if (r["origin"] == BASELINE) == (origin == BASELINE)]
        traces.append(
            go.Scatter(
                x=[float(r[x]) for r in sel],
                y=[float(r[quality]) for r in sel],
                mode="markers",
                name=f"{origin} plans",
                legendgroup=origin,
                showlegend=legend,
                marker={
                    "symbol": symbol,
                    "size": 10,
                    "color": [float(r["energy_mj_per_token"]) for r in sel],
                    "coloraxis": "coloraxis",  # one energy scale and colour bar for every trace
                    "line": {"width": [2 if str(r["trial"]) in front_ids else 0 for r in sel], "color": "red"},
                },
                text=[
                    f"trial {r['trial']} ({r['origin']})<br>{quality} {float(r[quality]):.3f}<br>"
                    f"weights {float(r['weights_mb']):.1f} MB, peak {float(r['memory_mb']):.1f} MB<br>"
                    f"energy {float(r['energy_mj_per_token']):.2f} mJ/token<br>"
                    f"{float(r['bits_per_weight']):.2f} bits/weight<br>{r['plan']}"
                    for r in sel
                ],
                hoverinfo="text",
            )
        )
    return traces


def _html_peer_trace(peers: Sequence[dict], x: str, quality: str, legend: bool) -> go.Scatter:
    """Another tool's files in view `x` as named triangles, each file's numbers on hover."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=[float(r[x]) for r in peers],
        y=[float(r[quality]) for r in peers],
        mode="markers+text",
        name="llama.cpp recipes",
        legendgroup="peers",
        showlegend=legend,
        marker={"symbol": "triangle-up-open", "size": 11, "color": "darkorange"},
        text=[r["name"] for r in peers],
        textposition="top right",
        textfont={"size": 9, "color": "darkorange"},
        hovertext=[
            f"{r['name']}<br>{quality} {float(r[quality]):.3f}<br>weights {float(r['weights_mb']):.1f} MB, "
            f"peak {float(r['memory_mb']):.1f} MB<br>{r['file']}"
            for r in peers
        ],
        hoverinfo="text",
    )


def front_html(
    rows: list[dict],
    front: list[dict],
    quality: str,
    limit_mb: float,
    title: str,
    path: Path,
    peers: Sequence[dict] = (),
) -> None:
    """Interactive plot (self-contained HTML): both views; hover shows each trial's numbers and plan file."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    done = _completed(rows)
    front_ids = {str(r["trial"]) for r in front}
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[t for _, t in VIEWS])
    for col, (x, _) in enumerate(VIEWS, start=1):
        for trace in _html_plan_traces(done, front_ids, x, quality, legend=col == 1):
            fig.add_trace(trace, row=1, col=col)
        if peers:
            fig.add_trace(_html_peer_trace(peers, x, quality, legend=col == 1), row=1, col=col)
        line = pareto_2d(done, x, quality)
        fig.add_trace(
            go.Scatter(
                x=[float(r[x]) for r in line],
                y=[float(r[quality]) for r in line],
                mode="lines",
                name="best in this view",
                legendgroup="line",
                showlegend=col == 1,
                line={"color": "red"},
            ),
            row=1,
            col=col,
        )
        if x == "memory_mb" and done and limit_mb <= 1.5 * max(float(r[x]) for r in done):
            fig.add_vline(
                x=limit_mb, line_dash="dash", line_color="crimson", annotation_text="app memory limit", row=1, col=col
            )
    fig.update_layout(
        title=f"{title} (red rings: the search's Pareto front)",
        yaxis_title=quality,
        template="plotly_white",
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": "mJ/token", "x": 1.02}},
        legend={"orientation": "h", "y": -0.2},
    )
    write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))  # written whole
