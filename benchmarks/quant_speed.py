"""Speed and error of autosquash's GGUF quantizers next to gguf.quants.quantize, per type.

Quantizes a 1536x576 and a 576x1536 N(0, 1) matrix (SmolLM2-135M's FFN shapes) to every type legal for
its rows and prints bits per weight, relative RMS error and seconds (best of --repeat), ours without and
with importance, and gguf's where the gguf package has a writer. The last column extrapolates our time
to all ~106M linear weights of SmolLM2-135M.

    python benchmarks/quant_speed.py [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress.quantize import quantize
from autosquash.formats.codecs import QUANTIZABLE_TYPES, dequantize
from autosquash.formats.gguf_types import tensor_type

SMOLLM2_LINEAR_VALUES = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)


def _timed(repeat: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Best wall-clock seconds of `repeat` calls fn(*args), and the last result."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def _rel_error(approx: np.ndarray | torch.Tensor, w: torch.Tensor) -> float:
    approx = torch.as_tensor(approx, dtype=torch.float32)
    return float((approx - w).norm() / w.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats, best kept (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    header = (
        f"{'shape':>9} {'type':>6} {'bpw':>6} | {'ours err':>8} {'ours s':>7} | {'imp err':>8} {'imp s':>7} | "
        f"{'gguf err':>8} {'gguf s':>7} | {'ours/imp s per 106M':>19}"
    )
    print(f"torch threads: {torch.get_num_threads()}, best of {args.repeat}")
    print(header)
    print("-" * len(header))
    for rows, cols in [(1536, 576), (576, 1536)]:
        w = torch.randn(rows, cols, generator=gen)
        importance = torch.exp(2.0 * torch.randn(cols, generator=gen))
        scale_to_model = SMOLLM2_LINEAR_VALUES / w.numel()
        for name in QUANTIZABLE_TYPES:
            t = tensor_type(name)
            if not t.fits_row(cols):
                continue
            ours_s, ours = _timed(args.repeat, quantize, w, name)
            imp_s, imp = _timed(args.repeat, quantize, w, name, importance)
            ours_err, imp_err = _rel_error(dequantize(ours), w), _rel_error(dequantize(imp), w)
            ggml = GGMLQuantizationType[name]
            try:
                gguf_s, data = _timed(args.repeat, gguf.quants.quantize, w.numpy(), ggml)
                gguf_err = f"{_rel_error(gguf.quants.dequantize(data.view(np.uint8), ggml), w):8.5f}"
                gguf_time = f"{gguf_s:7.3f}"
            except NotImplementedError:
                gguf_err, gguf_time = f"{'-':>8}", f"{'-':>7}"
            print(
                f"{rows:>4}x{cols:<4} {name:>6} {t.bits_per_weight:6.3f} | {ours_err:8.5f} {ours_s:7.3f} | "
                f"{imp_err:8.5f} {imp_s:7.3f} | {gguf_err} {gguf_time} | "
                f"{ours_s * scale_to_model:8.1f} / {imp_s * scale_to_model:8.1f}"
            )


if __name__ == "__main__":
    main()
