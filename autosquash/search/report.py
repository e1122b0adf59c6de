"""`autosquash report RUN`: one self-contained HTML page on a finished search (no network needed to view it).

The page holds the front as a table, the front plot, each front plan's layer map and its cost breakdown
on the phone, and for each plan the commands that export it and run it in llama.cpp. Where the peer benchmark
scored llama.cpp's own recipes for this search (peers.csv), they are in the plot and in a table beside the
best front plan no larger than each. Images are embedded
as data URIs; everything comes from the search's folder and its MLflow store.
"""

from __future__ import annotations

import base64
import csv
import html
import tempfile
from pathlib import Path

from autosquash.errors import AutosquashError
from autosquash.search.experiment import Experiment, load_experiment
from autosquash.search.outputs import FRONT_TABLE, read_peers, table_cell, write_layer_maps
from autosquash.track.mlflow_store import find_trial_run, search_tracking_uri
from autosquash.track.plots import front_png

# (metric, heading, scale, format) of a plan's cost breakdown, as the trial's run logged it
BREAKDOWN = (
    ("weights_bytes", "weights", 1e-6, "{:.1f} MB"),
    ("kv_cache_bytes", "KV cache", 1e-6, "{:.1f} MB"),
    ("runtime_overhead_bytes", "runtime", 1e-6, "{:.0f} MB"),
    ("peak_memory_bytes", "peak memory", 1e-6, "{:.1f} MB"),
    ("prefill_s", "prefill", 1.0, "{:.2f} s"),
    ("decode_tokens_per_s", "decode", 1.0, "{:.1f} tok/s"),
    ("compute_energy_j_per_token", "compute", 1e3, "{:.2f} mJ/tok"),
    ("dram_energy_j_per_token", "DRAM", 1e3, "{:.2f} mJ/tok"),
    ("static_energy_j_per_token", "static", 1e3, "{:.2f} mJ/tok"),
    ("energy_j_per_token", "energy", 1e3, "{:.2f} mJ/tok"),
    ("hours_continuous_generation", "battery", 1.0, "{:.1f} h"),
)
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}section{margin-top:2.5em}"""


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(heads: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _commands(run: Path, trial: int) -> str:
    name = f"trial-{trial:04d}"
    lines = [
        f"autosquash export --run {run} --trial {trial} --out {name}.gguf",
        f"llama-cli -m {name}.gguf -p 'The capital of France is' -n 32",
        f"# where export also wrote {name}.lora.gguf (a healed plan with quantized weights):",
        f"llama-cli -m {name}.gguf --lora {name}.lora.gguf -p 'The capital of France is' -n 32",
    ]
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>"


def _peer_table(peers: list[dict], front: list[dict], quality: str) -> str:
    """Each peer file beside the best front plan whose weights are no larger (quality ratio: below 1 it wins)."""
    rows = []
    for p in sorted(peers, key=lambda p: float(p["weights_mb"])):
        fits = [r for r in front if float(r["weights_mb"]) <= float(p["weights_mb"])]
        best = min(fits, key=lambda r: float(r[quality])) if fits else None
        ratio = float(best[quality]) / float(p[quality]) if best and float(p[quality]) > 0 else None
        rows.append(
            [
                p["name"],
                table_cell("{:.1f}", p["weights_mb"]),
                table_cell("{:.4f}", p[quality]),
                f"trial {best['trial']}" if best else "none",
                table_cell("{:.1f}", best["weights_mb"]) if best else "-",
                table_cell("{:.4f}", best[quality]) if best else "-",
                table_cell("{:.2f}", ratio),
            ]
        )
    heads = ["recipe", "weights MB", quality, "best front plan no larger", "its MB", f"its {quality}", "ratio"]
    return _table(heads, rows)


def build_report(run: Path) -> str:
    """The report page of the search in `run`, as HTML text."""
    if not (run / "experiment.yaml").is_file() or not (run / "pareto.csv").is_file():
        raise AutosquashError(f"{run} holds no finished search (no experiment.yaml or pareto.csv)")
    from autosquash.cost import load_phone
    from autosquash.models.load import load_arch

    exp: Experiment = load_experiment(run / "experiment.yaml")
    rows, front = _rows(run / "trials.csv"), _rows(run / "pareto.csv")
    arch = load_arch(exp.model)
    phone = load_phone(exp.phone)
    limit_mb = phone.app_memory_limit_bytes / 1e6
    uri = search_tracking_uri(run)
    parts = [
        f"<h1>{html.escape(exp.name)}</h1>",
        f"<p>{html.escape(exp.model)} on <b>{html.escape(exp.phone)}</b>: {len(rows)} trials, {len(front)} plans "
        f"on the Pareto front ({html.escape(', '.join(exp.objectives))} minimised). Quality is measured on "
        f"held-out {html.escape(exp.evaluation.source)} text ({exp.evaluation.tokens} tokens), against the "
        "uncompressed model.</p>",
        "<h2>Pareto front</h2>",
        _table([h for _, h, _ in FRONT_TABLE], [[table_cell(f, r.get(k)) for k, _, f in FRONT_TABLE] for r in front]),
    ]
    peers = read_peers(run)
    if peers:
        parts += [
            "<h2>llama.cpp's recipes</h2>",
            "<p>Files made by llama-quantize (benchmarks/vs_llamacpp.py), scored as the trials are: "
            f"{html.escape(exp.quality_objective)} on the same held-out tokens, priced on the same phone.</p>",
            _peer_table(peers, front, exp.quality_objective),
        ]
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "front.png"
        front_png(rows, front, exp.quality_objective, limit_mb, exp.name, plot, peers)
        parts += ["<h2>Quality against size</h2>", _img(plot, "front plot")]
        for r in front:
            trial = int(r["trial"])
            png = run / "layers" / f"trial-{trial:04d}.png"
            if not png.is_file():
                png = write_layer_maps(arch, trial, run)[0]
            run_info = find_trial_run(uri, exp.name, trial) if uri else None
            metrics = run_info.data.metrics if run_info else {}
            breakdown = [(h, table_cell(f, metrics[k] * s) if k in metrics else "-") for k, h, s, f in BREAKDOWN]
            parts += [
                f"<section><h2>Trial {trial} ({html.escape(r['origin'])})</h2>",
                f"<p>{html.escape(exp.quality_objective)} {table_cell('{:.4f}', r[exp.quality_objective])}, "
                f"{table_cell('{:.1f}', r['weights_mb'])} MB of weights, "
                f"plan <code>{html.escape(r['plan'])}</code></p>",
                f"<h3>Cost on {html.escape(exp.phone)}</h3>",
                _table([h for h, _ in breakdown], [[v for _, v in breakdown]]),
                "<h3>Where the bits went</h3>",
                _img(png, f"layer map of trial {trial}"),
                "<h3>Run it</h3>",
                _commands(run, trial),
                "</section>",
            ]
    body = "\n".join(parts)
    title = html.escape(f"autosquash report: {exp.name}")
    return f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>' + (
        f"<body>{body}</body></html>\n"
    )


def write_report(run: Path, out: Path) -> Path:
    """Write the report page of `run` to `out` (whole, then renamed: never half a page)."""
    text = build_report(run)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out
