"""autosquash's lattice IQ encoders (IQ3_S .. IQ2_XXS) against ggml's own (`ggml_quantize_chunk`, as llama-quantize
calls it, from the libggml-base that the pinned llama-cpp-python ships), both with the same importance vector, with
the K-quants on either side of them in bits (Q3_K, Q2_K) as the speed to match: values per second and
importance-weighted error, side by side in one process.

Data: a Student-t(5) matrix (heavy tails, like trained weights) and Qwen2.5-Coder-1.5B's blk.5.ffn_down.weight (its
Q6_K values, 1536 x 8960), each with a log-normal importance per input channel (like an imatrix's mean squared
activations), seeded. The error is sum(imp * (w - deq(q(w)))^2) / sum(imp * w^2), every side's bytes decoded by
autosquash's decoder (bit-exact with gguf-py's). Speeds are the best of `--reps` rounds that each time every
quantizer once (the error pass before them is the warm-up), which on a shared machine measures the code rather
than its neighbours; ggml on 1 thread and on 2 (two halves of the rows, as llama-quantize splits rows), autosquash
on 1 and on 2 torch threads.

    .venv/bin/python benchmarks/iq_lattice.py            # writes benchmarks/results/iq_lattice.txt/json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402
from benchmarks.codec_speed import _ggml  # noqa: E402

TYPES = ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "Q3_K", "Q2_K")
QWEN = Path.home() / ".cache/autosquash/assets/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
TENSOR = "blk.5.ffn_down.weight"


def _datasets(rows: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from autosquash.formats.gguf import open_gguf, read_tensor

    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, 4096, generator=g)
    student = z / (torch.randn(5, rows, 4096, generator=g).square().mean(0)).sqrt()
    ffn = read_tensor(next(t for t in open_gguf(QWEN).tensors if t.name == TENSOR)).contiguous()
    return {
        "student_t": (student, torch.exp(torch.randn(4096, generator=g))),
        "ffn_down": (ffn, torch.exp(torch.randn(ffn.shape[1], generator=g))),
    }


def run(reps: int, rows: int, types: tuple[str, ...] = TYPES) -> list[dict]:
    import gguf

    from autosquash.compress.quantize import quantize
    from autosquash.formats.codecs import QuantizedTensor, dequantize
    from autosquash.formats.gguf_types import tensor_type

    data = _datasets(rows)
    lib = _ggml()
    results, timed = [], {}  # timed: (type, quantizer) -> function of no arguments
    for name in types:
        gt = int(gguf.GGMLQuantizationType[name])
        lib.ggml_quantize_init(gt)
        row = {"type": name, "bits_per_weight": tensor_type(name).bits_per_weight}
        for label, (x, imp) in data.items():
            n_rows, cols = x.shape
            xn, impn = x.numpy(), imp.numpy()
            out = np.empty((n_rows, tensor_type(name).nbytes((1, cols))), np.uint8)

            def chunk(lo: int, hi: int, gt=gt, out=out, xn=xn, impn=impn, cols=cols) -> None:
                lib.ggml_quantize_chunk(gt, xn.ctypes.data, out.ctypes.data, lo * cols, hi - lo, cols, impn.ctypes.data)

            def weighted_error(data: np.ndarray, x=x, imp=imp, name=name) -> float:
                d = dequantize(QuantizedTensor(type=name, shape=tuple(x.shape), data=data))
                return float(((d - x).square() * imp).sum() / (x.square() * imp).sum())

            chunk(0, n_rows)
            row[f"{label}_ggml_error"] = weighted_error(out)
            row[f"{label}_ours_error"] = weighted_error(quantize(x, name, imp).data)
            if label == "student_t":  # speeds on the Student-t matrix only

                def ours(threads: int, x=x, imp=imp, name=name) -> None:
                    torch.set_num_threads(threads)
                    quantize(x, name, imp)

                def two_threads(chunk=chunk, n_rows=n_rows) -> None:
                    with ThreadPoolExecutor(2) as pool:
                        list(pool.map(lambda r: chunk(*r), [(0, n_rows // 2), (n_rows // 2, n_rows)]))

                mvals = x.numel() / 1e6
                timed[name, "ours_1t"] = mvals, lambda ours=ours: ours(1)
                timed[name, "ours_2t"] = mvals, lambda ours=ours: ours(2)
                timed[name, "ggml_1t"] = mvals, lambda chunk=chunk, n_rows=n_rows: chunk(0, n_rows)
                timed[name, "ggml_2t"] = mvals, two_threads
        results.append(row)
        print(json.dumps(row), flush=True)
    # Timed in rounds, every quantizer once per round, the best of each kept: load from other work on a shared
    # machine then slows all of them alike rather than whichever ran when it came.
    best = {key: float("inf") for key in timed}
    for _ in range(reps):
        for key, (_, fn) in timed.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    for row in results:
        for who in ("ours_1t", "ours_2t", "ggml_1t", "ggml_2t"):
            mvals, _ = timed[row["type"], who]
            row[f"{who}_mvals_per_s"] = mvals / best[row["type"], who]
    return results


def report(rows: list[dict], header: str) -> str:
    head = [
        "type",
        "bpw",
        "ours M/s 1 thr",
        "ours M/s 2 thr",
        "ggml M/s 1 thr",
        "ggml M/s 2 thr",
        "ours/ggml speed 1 thr",
        "error Student-t ours/ggml",
        "error ffn_down ours/ggml",
    ]
    body = [
        [
            r["type"],
            f"{r['bits_per_weight']:.4g}",
            f"{r['ours_1t_mvals_per_s']:.1f}",
            f"{r['ours_2t_mvals_per_s']:.1f}",
            f"{r['ggml_1t_mvals_per_s']:.1f}",
            f"{r['ggml_2t_mvals_per_s']:.1f}",
            f"{r['ours_1t_mvals_per_s'] / r['ggml_1t_mvals_per_s']:.2f}",
            f"{r['student_t_ours_error']:.4f}/{r['student_t_ggml_error']:.4f} = "
            f"{r['student_t_ours_error'] / r['student_t_ggml_error']:.3f}",
            f"{r['ffn_down_ours_error']:.4f}/{r['ffn_down_ggml_error']:.4f} = "
            f"{r['ffn_down_ours_error'] / r['ffn_down_ggml_error']:.3f}",
        ]
        for r in rows
    ]
    note = (
        "Speeds in millions of values per second on the Student-t matrix, the best of the timing rounds; errors:"
        " importance-weighted squared error over the weighted energy, both sides' bytes decoded by autosquash."
    )
    return header + "\n\n" + table(head, body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timing rounds, the best of each quantizer kept (default 5)")
    p.add_argument("--rows", type=int, default=1024, help="rows of the 4096-wide Student-t matrix (default 1024)")
    p.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types to compare (default: all listed)")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for iq_lattice.txt/json")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    command = " ".join(["python", "benchmarks/iq_lattice.py", *sys.argv[1:]])
    header = f"# {command}  (commit {commit.stdout.strip()}, torch {torch.__version__})"
    rows = run(args.reps, args.rows, tuple(args.types))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "iq_lattice.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    (results / "iq_lattice.txt").write_text(report(rows, header))
    print(report(rows, header))


if __name__ == "__main__":
    main()
