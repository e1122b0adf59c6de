"""Plots of a search: quality against memory, energy as colour, baselines marked, the front joined."""

from __future__ import annotations

from pathlib import Path

BASELINE, SEARCHED = "baseline", "searched"  # searched: every origin but the seeded uniform baselines


def _of(pts: list, kind: str) -> list:
    return [p for p in pts if (p[3]["origin"] == BASELINE) == (kind == BASELINE)]


def _points(rows: list[dict], quality: str) -> list[tuple[float, float, float, dict]]:
    out = []
    for r in rows:
        if r.get("state", "COMPLETE") != "COMPLETE":
            continue
        out.append((float(r["memory_mb"]), float(r[quality]), float(r["energy_mj_per_token"]), r))
    return out


def front_png(rows: list[dict], front: list[dict], quality: str, limit_mb: float, title: str, path: Path) -> None:
    """Static plot (PNG) for the MLflow run page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _points(rows, quality)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for origin, marker, size in ((SEARCHED, "o", 30), (BASELINE, "s", 60)):
        sel = _of(pts, origin)
        if sel:
            sc = ax.scatter(
                [p[0] for p in sel],
                [p[1] for p in sel],
                c=[p[2] for p in sel],
                marker=marker,
                s=size,
                cmap="viridis",
                edgecolors="k",
                linewidths=0.4,
                label=f"{origin} plans",
                vmin=min(p[2] for p in pts),
                vmax=max(p[2] for p in pts),
            )
    front_pts = sorted(_points(front, quality))
    if front_pts:
        ax.plot([p[0] for p in front_pts], [p[1] for p in front_pts], "r-", lw=1.2, label="Pareto front")
    if pts:
        fig.colorbar(sc, ax=ax, label="energy (mJ/token)")
        top = max(p[0] for p in pts)
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
    ax.set_xlabel("peak memory on the phone (MB)")
    ax.set_ylabel(quality)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def front_html(rows: list[dict], front: list[dict], quality: str, limit_mb: float, title: str, path: Path) -> None:
    """Interactive plot (self-contained HTML): hover shows each trial's numbers and plan file."""
    import plotly.graph_objects as go

    pts = _points(rows, quality)
    front_ids = {r["trial"] for r in front}
    fig = go.Figure()
    for origin, symbol in ((SEARCHED, "circle"), (BASELINE, "square")):
        sel = _of(pts, origin)
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in sel],
                y=[p[1] for p in sel],
                mode="markers",
                name=f"{origin} plans",
                marker={
                    "symbol": symbol,
                    "size": 10,
                    "color": [p[2] for p in sel],
                    "coloraxis": "coloraxis",  # one energy scale and colour bar for both traces
                    "line": {"width": [2 if p[3]["trial"] in front_ids else 0 for p in sel], "color": "red"},
                },
                text=[
                    f"trial {p[3]['trial']} ({p[3]['origin']})<br>{quality} {p[1]:.3f}<br>memory {p[0]:.1f} MB<br>"
                    f"energy {p[2]:.2f} mJ/token<br>{float(p[3]['bits_per_weight']):.2f} bits/weight<br>{p[3]['plan']}"
                    for p in sel
                ],
                hoverinfo="text",
            )
        )
    front_pts = sorted(_points(front, quality))
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in front_pts],
            y=[p[1] for p in front_pts],
            mode="lines",
            name="Pareto front",
            line={"color": "red"},
        )
    )
    if pts and limit_mb <= 1.5 * max(p[0] for p in pts):
        fig.add_vline(x=limit_mb, line_dash="dash", line_color="crimson", annotation_text="app memory limit")
    fig.update_layout(
        title=title,
        xaxis_title="peak memory on the phone (MB)",
        yaxis_title=quality,
        template="plotly_white",
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": "mJ/token", "x": 1.02}},
        legend={"orientation": "h", "y": -0.2},
    )
    fig.write_html(path, include_plotlyjs=True, full_html=True)
