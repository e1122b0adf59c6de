"""autosquash's quantizers against llama.cpp's own (ggml's `ggml_quantize_chunk`, as llama-quantize calls it),
both with an importance vector: values per second and importance-weighted error, side by side, same process.

Data: a 2048 x 4096 matrix of Student-t(5) values (heavy tails, like trained weights) and a log-normal
importance per input channel (like an imatrix's mean squared activations), seeded. ggml is the library the
pinned llama-cpp-python ships (libggml-base); it runs on 1 thread and on 2 (two halves of the rows on two
threads, as llama-quantize splits rows); autosquash with torch's 2 threads. The error is
sum(imp * (w - deq(q(w)))^2) / sum(imp * w^2); each side's bytes are decoded by autosquash's decoder, which
the tests hold to gguf-py's.

    .venv/bin/python benchmarks/codec_speed.py            # writes benchmarks/results/codec_speed.txt/json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q4_0", "IQ4_NL", "IQ4_XS")
ROWS, COLS = 2048, 4096


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run(reps: int, types: tuple[str, ...] = TYPES) -> list[dict]:
    import gguf

    from autosquash.compress.quantize import quantize
    from autosquash.formats.codecs import QuantizedTensor, dequantize
    from autosquash.formats.gguf_types import tensor_type

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.distributions.StudentT(5.0).sample((ROWS, COLS))
    imp = torch.exp(torch.randn(COLS))
    xn, impn = x.numpy(), imp.numpy()
    lib = _ggml()

    def err(name: str, data: np.ndarray) -> float:
        d = dequantize(QuantizedTensor(type=name, shape=(ROWS, COLS), data=data))
        return float(((d - x).square() * imp).sum() / (x.square() * imp).sum())

    rows = []
    for name in types:
        gt = int(gguf.GGMLQuantizationType[name])
        lib.ggml_quantize_init(gt)
        out = np.empty((ROWS, tensor_type(name).nbytes((1, COLS))), np.uint8)

        def chunk(lo: int, hi: int, gt=gt, out=out) -> None:
            lib.ggml_quantize_chunk(gt, xn.ctypes.data, out.ctypes.data, lo * COLS, hi - lo, COLS, impn.ctypes.data)

        def two_threads(chunk=chunk) -> None:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda r: chunk(*r), [(0, ROWS // 2), (ROWS // 2, ROWS)]))

        ggml_1 = _timed(lambda chunk=chunk: chunk(0, ROWS), reps)
        ggml_2 = _timed(two_threads, reps)
        ours_s = _timed(lambda name=name: quantize(x, name, imp), reps)
        ours = quantize(x, name, imp).data
        n = ROWS * COLS / 1e6
        rows.append(
            {
                "type": name,
                "ours_mvals_per_s": n / ours_s,
                "ggml_1t_mvals_per_s": n / ggml_1,
                "ggml_2t_mvals_per_s": n / ggml_2,
                "ours_error": err(name, ours),
                "ggml_error": err(name, out),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict]) -> str:
    head = ["type", "ours M/s (2 thr)", "ggml M/s 1 thr", "ggml M/s 2 thr", "ours/ggml speed", "ours/ggml error"]
    body = [
        [
            r["type"],
            f"{r['ours_mvals_per_s']:.1f}",
            f"{r['ggml_1t_mvals_per_s']:.1f}",
            f"{r['ggml_2t_mvals_per_s']:.1f}",
            f"{r['ours_mvals_per_s'] / r['ggml_2t_mvals_per_s']:.2f}",
            f"{r['ours_error'] / r['ggml_error']:.3f}",
        ]
        for r in rows
    ]
    note = (
        f"{ROWS}x{COLS} Student-t(5) weights, log-normal importance per input channel; error: importance-weighted"
        " squared error over the weighted energy, each side's bytes decoded by autosquash; speed in millions of"
        " values per second, autosquash on 2 torch threads."
    )
    return table(head, body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2, help="timed repeats per quantizer (default 2)")
    p.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types to compare (default: all listed)")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for codec_speed.txt/json")
    args = p.parse_args()
    rows = run(args.reps, tuple(args.types))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "codec_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / "codec_speed.txt").write_text(report(rows))
    print(report(rows))


if __name__ == "__main__":
    main()
