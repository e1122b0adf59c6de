"""The bit-level pieces of ggml's block layouts (ggml-common.h), shared by every block type: f16 fields and codes of
a few bits stacked into bytes."""

from __future__ import annotations

import torch
from torch import Tensor


def f16_rounded(v: Tensor) -> Tensor:
    """`v` rounded to the f16 a block stores (as float32, so codes are chosen against the stored scale)."""
    return v.to(torch.float16).to(torch.float32)


def f16_bytes(v: Tensor) -> Tensor:
    """Values (N,) as f16 fields, (N, 2) bytes."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def read_f16(b: Tensor) -> Tensor:
    """(N, 2) bytes -> (N, 1) float32, like numpy's `.view(np.float16).astype(np.float32)`."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """OR q[..., i, :] << (i * bits) over axis -2: how ggml stacks strided sub-rows of a block into bytes."""
    out = torch.zeros(q.shape[:-2] + q.shape[-1:], dtype=torch.uint8, device=q.device)
    for i in range(q.shape[-2]):
        out |= q[..., i, :].to(torch.uint8) << (i * bits)
    return out


def unpack_bits(b: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_bits: (..., L) bytes -> (..., count, L) codes of `bits` bits each."""
    shifts = torch.arange(0, count * bits, bits, dtype=torch.uint8, device=b.device).reshape(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)
