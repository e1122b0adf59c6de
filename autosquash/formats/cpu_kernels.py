"""The Q4_K / Q5_K / Q6_K decoders and the Q3_K / Q6_K packers compiled for the CPU: they compute exactly what the
torch ones in codecs do (no fused multiply-add), the decoders about 5x as fast on one thread, the packers some 50x.
tests/formats/test_cpu_kernels.py holds each beside its torch path (and the decoders beside gguf's).
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


@njit(nogil=True, cache=True)
def pack_q3_k(q, sc, out):  # pragma: no cover - compiled
    """Q3_K super-blocks from codes q (N, 256) int8 in [-4, 3] and sub-block scales sc (N, 16) int8 in [-32, 31],
    into out (N, 110) but its f16 d (the last 2 bytes): hmask (bit i of byte j: bit 2 of code 32 i + j, plus 4),
    qs (bits 0-1 of four codes 32 apart per byte, per half), then the 12 bytes of scales (low nibbles of
    sub-blocks j and j + 8, then the high 2 bits of j, j + 4, j + 8, j + 12), each plus 32."""
    for n in range(q.shape[0]):
        qn, sn, o = q[n], sc[n], out[n]
        for j in range(32):
            h = 0
            for i in range(8):
                h |= ((qn[32 * i + j] + 4) >> 2) << i
            o[j] = h
        for half in range(2):
            for j in range(32):
                b = 0
                for i in range(4):
                    b |= ((qn[128 * half + 32 * i + j] + 4) & 3) << (2 * i)
                o[32 + 32 * half + j] = b
        for j in range(8):
            o[96 + j] = ((sn[j] + 32) & 15) | (((sn[8 + j] + 32) & 15) << 4)
        for j in range(4):
            b = 0
            for i in range(4):
                b |= ((sn[4 * i + j] + 32) >> 4) << (2 * i)
            o[104 + j] = b


@njit(nogil=True, cache=True)
def pack_q6_k(q, sc, out):  # pragma: no cover - compiled
    """Q6_K super-blocks from codes q (N, 256) int8 in [-32, 31] and sub-block scales sc (N, 16) int8, into out
    (N, 210) but its f16 d (the last 2 bytes): per half of 128 codes, ql (low nibbles of codes j and j + 64 per
    byte) and qh (the high 2 bits of four codes 32 apart per byte), each code plus 32; then the 16 scales."""
    for n in range(q.shape[0]):
        qn, o = q[n], out[n]
        for half in range(2):
            base = 128 * half
            for j in range(64):
                o[64 * half + j] = ((qn[base + j] + 32) & 15) | (((qn[base + 64 + j] + 32) & 15) << 4)
            for j in range(32):
                b = 0
                for i in range(4):
                    b |= ((qn[base + 32 * i + j] + 32) >> 4) << (2 * i)
                o[128 + 32 * half + j] = b
        for k in range(16):
            o[192 + k] = sc[n, k]
