"""Seconds to quantize a large token table or output head per GGUF type: plainly (`quantize`), weighted by
the head's input (`quantize_no_worse`) and error-compensated through its covariance
(`quantize_compensated_no_worse`), against a git revision's quantizers measured in the same process.

Two shapes: Qwen2.5-1.5B's output head (151,936 x 1,536) and Gemma-3's tied table (262,144 x 640; no
K-quant or IQ4_XS fits its rows). Weights are Student-t(4), row scales log-normal (heavy tails, like a
trained table), or a real table from a GGUF file (`--table FILE:TENSOR`, cycled or cut to the shape).
The head's input h has E[h²] log-normal over about three orders of magnitude with four channels 30x larger,
and correlated channels (a rank-64 factor plus 0.3 of noise, as a covariance). The baseline's compensated
quantizer is timed on `--baseline-rows` rows and scaled to the table (it is linear in rows; it takes minutes
per type on the whole table); the rest of both sides on the whole table. `out err` compares the compensated
bytes' output error e H eᵀ, summed over those rows, against the baseline's.

    .venv/bin/python benchmarks/table_speed.py --baseline ee4b96b   # writes benchmarks/results/table_speed.txt
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")
SHAPES = ((151_936, 1_536), (262_144, 640))
# Each quantizer's arguments, from (weights, type, E[h²], E[h hᵀ], the tables' dampening).
ARGS = {
    "plain": lambda w, t, imp, h, damp: (w, t),
    "weighted": lambda w, t, imp, h, damp: (w, t, imp),
    "compensated": lambda w, t, imp, h, damp: (w, t, h, imp, damp),
}


def revision_quantizers(rev: str) -> dict:
    """`quantize`, `quantize_no_worse` and `quantize_compensated_no_worse` of git revision `rev`, imported
    from a copy of its package beside this tree's (their modules keep their own globals once imported)."""
    folder = tempfile.mkdtemp(prefix="table-speed-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "autosquash"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)

    def ours() -> dict:
        return {k: m for k, m in sys.modules.items() if k == "autosquash" or k.startswith("autosquash.")}

    saved = ours()
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, folder)
    try:
        try:
            quantizer = importlib.import_module("autosquash.compress.quantize")
        except ModuleNotFoundError:  # a revision from before the quantizers moved out of formats/
            quantizer = importlib.import_module("autosquash.formats.codecs")
        try:
            gptq = importlib.import_module("autosquash.compress.gptq")
        except ModuleNotFoundError:  # a revision from before GPTQ moved out of formats/
            gptq = importlib.import_module("autosquash.formats.gptq")
    finally:
        sys.path.remove(folder)
        for k in ours():
            del sys.modules[k]
        sys.modules.update(saved)
    return {
        "plain": quantizer.quantize,
        "weighted": quantizer.quantize_no_worse,
        "compensated": gptq.quantize_compensated_no_worse,
    }


def statistics(cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[h²], E[h hᵀ]) of a head's input: log-normal channel scales, a few massive channels, correlated."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.2 * torch.randn(cols, generator=g))
    scale[torch.randperm(cols, generator=g)[:4]] *= 30
    factor = torch.randn(cols, 64, generator=g) / 8
    corr = factor @ factor.T + 0.3 * torch.eye(cols)
    d = corr.diagonal().sqrt()
    h = corr / d[:, None] / d[None, :] * scale[:, None] * scale[None, :]
    return h.diagonal().clone(), h


def weights(rows: int, cols: int, source: str | None, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) table: random heavy-tailed rows, or a GGUF file's tensor (FILE:TENSOR) cut and cycled."""
    if source is None:
        g = torch.Generator().manual_seed(seed)
        w = torch.distributions.StudentT(4.0).sample((rows, cols)).mul_(0.02)
        return w.mul_(torch.exp(0.3 * torch.randn(rows, 1, generator=g)))
    from autosquash.formats.gguf import open_gguf, read_tensor

    path, name = source.rsplit(":", 1)
    t = read_tensor(next(t for t in open_gguf(path).tensors if t.name == name))
    reps = (-(-rows // t.shape[0]), -(-cols // t.shape[1]))
    return t.repeat(*reps)[:rows, :cols].contiguous()


def output_error(q, w: torch.Tensor, h: torch.Tensor) -> float:
    """e H eᵀ summed over the rows, relative to w H wᵀ."""
    from autosquash.formats.codecs import dequantize

    e = dequantize(q) - w
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run(shapes, types, baseline: str | None, baseline_rows: int, source: str | None) -> list[dict]:
    from autosquash.compress.apply import TABLE_DAMP, TABLE_MIN_COMPENSATED_ERROR
    from autosquash.compress.gptq import quantize_compensated_no_worse
    from autosquash.compress.quantize import quantize, quantize_no_worse
    from autosquash.formats.gguf_types import tensor_type

    # As compress.apply.quantized_table quantizes a table the head reads.
    compensated = functools.partial(quantize_compensated_no_worse, min_error=TABLE_MIN_COMPENSATED_ERROR)
    new = {"plain": quantize, "weighted": quantize_no_worse, "compensated": compensated}
    old = revision_quantizers(baseline) if baseline else None
    rows_out = []
    for rows, cols in shapes:
        w = weights(rows, cols, source)
        imp, h = statistics(cols)
        sample = w[:baseline_rows]
        for name in types:
            if not tensor_type(name).fits_row(cols):
                continue
            row = {"shape": f"{rows}x{cols}", "type": name}
            for label, fn in new.items():
                row[f"new_{label}_s"], q = _timed(fn, *ARGS[label](w, name, imp, h, TABLE_DAMP))
                part = type(q)(q.type, (sample.shape[0], cols), q.data[: sample.shape[0]])
                if old is not None:
                    s, q_old = _timed(old[label], *ARGS[label](sample, name, imp, h, TABLE_DAMP))
                    row[f"old_{label}_s"] = s * rows / sample.shape[0]
                    row[f"same_{label}_rows"] = float((q_old.data == part.data).all(-1).mean())
                    row[f"old_{label}_out_err"] = output_error(q_old, sample, h)
                row[f"new_{label}_out_err"] = output_error(part, sample, h)
                row[f"new_{label}_bytes"] = q.data
            row["compensates"] = not np.array_equal(row.pop("new_compensated_bytes"), row["new_weighted_bytes"])
            for label in ("plain", "weighted"):
                row.pop(f"new_{label}_bytes")
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def report(rows: list[dict], header: str, note: str) -> str:
    has_old = any("old_plain_s" in r for r in rows)
    kinds = ("plain", "weighted", "compensated")
    head = ["shape", "type", *(f"{k} s" for k in kinds), *(f"{k} err" for k in kinds), "comp."]
    if has_old:
        head = ["shape", "type", *(f"{k} s old/new" for k in kinds), "same rows %", "err weighted", "err comp new/old"]
        head.append("comp.")
    body = []
    for r in rows:
        if has_old:
            same = " / ".join(f"{100 * r[f'same_{k}_rows']:.2f}" for k in kinds)
            ratio = r["new_compensated_out_err"] / r["old_compensated_out_err"] if r["old_compensated_out_err"] else 1
            body.append(
                [
                    r["shape"],
                    r["type"],
                    *(f"{r[f'old_{k}_s']:.1f} / {r[f'new_{k}_s']:.1f}" for k in kinds),
                    same,
                    f"{r['new_weighted_out_err']:.2e}",
                    f"{r['new_compensated_out_err']:.2e} / {ratio:.3f}",
                    "yes" if r["compensates"] else "no",
                ]
            )
        else:
            seconds = (f"{r[f'new_{k}_s']:.1f}" for k in kinds)
            errors = (f"{r[f'new_{k}_out_err']:.2e}" for k in kinds)
            body.append([r["shape"], r["type"], *seconds, *errors, "yes" if r["compensates"] else "no"])
    return header + "\n" + table(head, body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="git revision whose quantizers are timed beside this tree's")
    p.add_argument("--baseline-rows", type=int, default=8192, help="rows the baseline's compensation is timed on")
    p.add_argument("--shapes", nargs="+", default=[f"{r}x{c}" for r, c in SHAPES], help="ROWSxCOLS tables")
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--table", help="a real table, FILE.gguf:TENSOR, instead of random weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", help="folder for table_speed.txt/json (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    load_before = os.getloadavg()[0]
    rows = run(shapes, args.types, args.baseline, args.baseline_rows, args.table)
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    command = " ".join([".venv/bin/python benchmarks/table_speed.py", *sys.argv[1:]])
    header = f"# {command}  (commit {commit.stdout.strip()}, {args.threads} torch threads, {load})"
    note = (
        "Seconds per table, this tree on the whole table; old: the baseline revision on its first "
        f"{args.baseline_rows} rows, scaled to the table's rows. same rows: the share of those rows whose bytes "
        "agree, plain / weighted / compensated (float sums taken in another order flip a rare near-tie). err: "
        "the output error e H eᵀ / w H wᵀ on those rows (comp new/old: its ratio to the baseline's). "
        "compensated: as compress.apply.quantized_table runs it (a slice whose weighted encoding errs below "
        "TABLE_MIN_COMPENSATED_ERROR by diag H stays uncompensated; comp. says whether any slice was "
        "compensated); the baseline compensates every slice."
    )
    text = report(rows, header, note)
    print(text)
    if args.results:
        folder = Path(args.results)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
        (folder / "table_speed.txt").write_text(text)


if __name__ == "__main__":
    main()
