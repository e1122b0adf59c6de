"""The Q4_K / Q5_K / Q6_K decoders compiled for the CPU: they compute exactly what the torch ones in codecs do (no
fused multiply-add), about 5x as fast on one thread. tests/formats/test_cpu_kernels.py holds each beside its torch
path and gguf's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_F = np.float32


@njit(nogil=True, cache=True)
def decode_k_affine(b, d, dmin, qs, qh, out):  # pragma: no cover - compiled
    """Q4_K / Q5_K super-blocks b (N, 144 or 176) uint8, their f16 d and dmin as float32 (N,), into out (N, 256):
    (d * sc) * q - (dmin * m) per sub-block of 32 (get_scale_min_k4's 6-bit scales and mins), each code's low
    4 bits from the 128 bytes at offset qs, Q5_K's fifth bit from the 32 at qh (qh < 0: Q4_K, none)."""
    for n in range(b.shape[0]):
        blk = b[n]
        for k in range(8):
            if k < 4:
                sc = blk[4 + k] & 63
                m = blk[8 + k] & 63
            else:
                sc = (blk[8 + k] & 15) | ((blk[k] >> 6) << 4)
                m = (blk[8 + k] >> 4) | ((blk[4 + k] >> 6) << 4)
            scale = d[n] * _F(sc)
            mn = dmin[n] * _F(m)
            base = qs + 32 * (k // 2)
            shift = 4 * (k % 2)
            for j in range(32):
                q = (blk[base + j] >> shift) & 15
                if qh >= 0:
                    q |= ((blk[qh + j] >> k) & 1) << 4
                out[n, 32 * k + j] = scale * _F(q) - mn


@njit(nogil=True, cache=True)
def decode_q6_k(b, d, out):  # pragma: no cover - compiled
    """Q6_K super-blocks b (N, 210) uint8, their f16 d as float32 (N,), into out (N, 256): (d * sc) * q per
    sub-block of 16, q = 6 bits (4 in ql, 2 in qh) less 32."""
    for n in range(b.shape[0]):
        blk = b[n]
        for k in range(16):
            scale = d[n] * _F(np.int8(blk[192 + k]))
            for t in range(16):
                v = 16 * k + t
                h, r = v // 128, v % 128
                low = (blk[h * 64 + r % 64] >> (4 * (r // 64))) & 15
                high = (blk[128 + h * 32 + r % 32] >> (2 * (r // 32))) & 3
                out[n, v] = scale * _F(np.int32(low | (high << 4)) - 32)
