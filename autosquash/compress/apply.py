"""Apply a plan to a base model: prune, then decompose, then quantize, layer by layer.

`quantized_tensors` yields the GGUF bytes of every compressed tensor; `compress` builds the float
model a trial evaluates by decoding exactly those bytes, so a trial scores what its export holds.
Each compressed tensor is computed once per (layer, choice) and reused from a variant cache, which
keeps the bytes (a quarter to a twelfth of the float32 weights) and decodes them on every use.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from autosquash.compress.calibrate import Stats
from autosquash.compress.gguf_types import legal_type, legal_type_or_f16
from autosquash.compress.kronecker import KronFactors, KronLinear, kron_factors
from autosquash.compress.lowrank import LowRankLinear, linear_with, svd_factors
from autosquash.compress.plan import (
    ATTN_LINEARS,
    FFN_LINEARS,
    Plan,
    factor_rank,
    kept_ffn_channels,
    kept_kv_heads,
    kron_terms,
)
from autosquash.compress.prune import input_channel_importance, keep_channels, kv_group_importance
from autosquash.compress.quant import QuantizedTensor, dequantize, quantize
from autosquash.models.arch import Arch

# A compressed weight as deployed: its GGUF bytes (two matrices, A then B, for SVD factors).
Variant = tuple[QuantizedTensor, ...]


@dataclass(frozen=True)
class KronVariant:
    """A linear as permuted Kronecker factors: A and B quantized (one row per term), the rest exact."""

    a: QuantizedTensor
    b: QuantizedTensor
    a_shape: tuple[int, int, int]  # (r, m1, n1)
    b_shape: tuple[int, int, int]  # (r, m2, n2)
    row_perm: torch.Tensor
    col_perm: torch.Tensor
    col_scale: torch.Tensor | None = None

    def factors(self) -> KronFactors:
        """The factors a trial evaluates: A and B decoded from their GGUF bytes."""
        a, b = dequantize(self.a).reshape(self.a_shape), dequantize(self.b).reshape(self.b_shape)
        return KronFactors(a, b, self.row_perm, self.col_perm, self.col_scale)


def dense(variant: Variant | KronVariant) -> torch.Tensor:
    """The float32 matrix a compressed weight stands for: W, B·A for SVD factors, or the Kronecker sum."""
    if isinstance(variant, KronVariant):
        return variant.factors().matrix()
    if len(variant) == 2:
        return dequantize(variant[1]) @ dequantize(variant[0])
    return dequantize(variant[0])


@dataclass
class VariantCache:
    """Least-recently-used store of compressed tensors, bounded in bytes."""

    max_bytes: int = 2 << 30
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        self._items: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0

    @classmethod
    def _size(cls, value) -> int:
        """Bytes a cached value holds: GGUF bytes and tensors, nested in tuples or a KronVariant."""
        if value is None:
            return 0
        if isinstance(value, QuantizedTensor):
            return value.data.nbytes
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, KronVariant):
            return cls._size((value.a, value.b, value.row_perm, value.col_perm, value.col_scale))
        return sum(cls._size(v) for v in value)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def decoded_nbytes(self) -> int:
        """Bytes the held weights take once decoded to float32 (what each use of them allocates)."""

        def size(value) -> int:
            if isinstance(value, QuantizedTensor):
                return value.shape[0] * value.shape[1] * 4
            if isinstance(value, KronVariant):
                return size((value.a, value.b, value.row_perm, value.col_perm, value.col_scale))
            if isinstance(value, tuple):
                return sum(size(v) for v in value)
            return self._size(value)

        return sum(size(v) for v in self._items.values())

    def get(self, key: tuple, make: Callable[[], tuple]) -> tuple:
        """The cached value of `key`, made (and cached) on a miss."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()
        self._items[key] = value
        self._bytes += self._size(value)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size(old)
        return value


def quantize_rows(weight: torch.Tensor, quant: str, input_sq: torch.Tensor | None) -> QuantizedTensor:
    """`weight` in `quant`, or in F16 where its rows do not fit `quant`'s blocks (as llama.cpp falls back)."""
    return quantize(weight, legal_type_or_f16(quant, weight.shape[1]), input_sq)


def compress_linear(weight: torch.Tensor, quant: str, rank: int, input_sq: torch.Tensor | None) -> Variant:
    """One linear's deployed weights (one matrix, or the two SVD factors A then B), on their GGUF grid."""
    if rank == 0:
        return (quantize_rows(weight, quant, input_sq),)
    a, b = svd_factors(weight, rank, input_sq)
    return quantize_rows(a, quant, input_sq), quantize_rows(b, quant, None)


def compress_kron(weight: torch.Tensor, quant: str, terms: int, input_sq: torch.Tensor | None) -> KronVariant:
    """Permuted Kronecker factors of one linear (activation-aware), then A and B on their GGUF grid."""
    sq = input_sq if input_sq is not None else torch.ones(weight.shape[1])
    f = kron_factors(weight, terms, input_sq=sq)
    a = quantize_rows(f.a.reshape(terms, -1), quant, None)
    b = quantize_rows(f.b.reshape(terms, -1), quant, None)
    return KronVariant(a, b, tuple(f.a.shape), tuple(f.b.shape), f.row_perm, f.col_perm, f.col_scale)


def _ffn_keep(down_weight: torch.Tensor, down_sq: torch.Tensor | None, keep: int) -> tuple[torch.Tensor]:
    return (keep_channels(input_channel_importance(down_weight, down_sq), keep),)


def _kv_keep(o_weight: torch.Tensor, o_sq: torch.Tensor | None, arch: Arch, keep: int) -> tuple[torch.Tensor, ...]:
    """Rows of q (query heads) and of k/v (KV heads) of the `keep` most important KV groups."""
    groups = keep_channels(kv_group_importance(o_weight, o_sq, arch.n_kv_heads), keep)
    d, per_group = arch.head_dim, arch.n_heads // arch.n_kv_heads
    kv_rows = (groups[:, None] * d + torch.arange(d)).flatten()
    q_rows = (groups[:, None] * per_group * d + torch.arange(per_group * d)).flatten()
    return q_rows, kv_rows


def _selections(block, i: int, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache) -> dict[str, tuple]:
    """(kept rows, kept input columns) of each linear of block `i` after structured pruning; None keeps all.

    A linear missing from the result belongs to a removed sublayer.
    """
    out: dict[str, tuple] = {}
    kv = kept_kv_heads(arch, plan.choice(f"blk.{i}.attn"))
    if kv == arch.n_kv_heads:
        out.update({name: (None, None) for name, _ in ATTN_LINEARS})
    elif kv > 0:
        o_sq = stats.get(f"model.layers.{i}.self_attn.o_proj")
        q_rows, kv_rows = cache.get(
            ("kv_keep", i, kv), partial(_kv_keep, block.self_attn.o_proj.weight.data, o_sq, arch, kv)
        )
        out.update(attn_q=(q_rows, None), attn_k=(kv_rows, None), attn_v=(kv_rows, None), attn_output=(None, q_rows))
    ff = kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn"))
    if ff == arch.intermediate_size:
        out.update({name: (None, None) for name, _ in FFN_LINEARS})
    elif ff > 0:
        down_sq = stats.get(f"model.layers.{i}.mlp.down_proj")
        (idx,) = cache.get(("ffn_keep", i, ff), partial(_ffn_keep, block.mlp.down_proj.weight.data, down_sq, ff))
        out.update(ffn_gate=(idx, None), ffn_up=(idx, None), ffn_down=(None, idx))
    return out


def quantized_tensors(
    base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache | None = None
) -> Iterator[tuple[str, str, Variant]]:
    """(GGUF name, module path, variant) for every compressed weight: block linears, then embeddings."""
    cache = cache or VariantCache(max_bytes=0)
    for i, block in enumerate(base.model.layers):
        kept = _selections(block, i, arch, plan, stats, cache)
        for group, linears in (("attn", ATTN_LINEARS), ("ffn", FFN_LINEARS)):
            choice = plan.choice(f"blk.{i}.{group}")
            for gguf_name, path in linears:
                if gguf_name not in kept:
                    continue
                rows, cols = kept[gguf_name]
                w = block.get_submodule(path).weight.data
                input_sq = stats.get(f"model.layers.{i}.{path}")
                if rows is not None:
                    w = w[rows]
                if cols is not None:
                    w = w[:, cols]
                    input_sq = input_sq[cols] if input_sq is not None else None
                quant = choice.quant_for(gguf_name)
                terms = kron_terms(w.shape[0], w.shape[1], choice.kron_rank)
                rank = factor_rank(w.shape[0], w.shape[1], choice.rank_ratio)
                key = (i, gguf_name, tuple(w.shape), rank, terms, legal_type_or_f16(quant, w.shape[1]))
                if terms:
                    variant = cache.get(key, partial(compress_kron, w, quant, terms, input_sq))
                else:
                    variant = cache.get(key, partial(compress_linear, w, quant, rank, input_sq))
                yield f"blk.{i}.{gguf_name}", f"model.layers.{i}.{path}", variant
    embed_type = legal_type(plan.embed_quant, arch.hidden_size)
    emb = base.model.embed_tokens.weight.data
    yield (
        "token_embd",
        "model.embed_tokens",
        cache.get(("token_embd", embed_type), lambda: (quantize(emb, embed_type, None),)),
    )
    if not arch.tied_embeddings:
        out_type = legal_type(plan.output_quant or plan.embed_quant, arch.hidden_size)
        head = base.lm_head.weight.data
        yield "output", "lm_head", cache.get(("output", out_type), lambda: (quantize(head, out_type, None),))


class RemovedAttention(torch.nn.Module):
    """An attention sublayer pruned away: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(torch.nn.Module):
    """An FFN sublayer pruned away: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _linear_from(variant: Variant | KronVariant) -> torch.nn.Module:
    """The module a trial evaluates, its weights decoded from the variant's GGUF bytes."""
    if isinstance(variant, KronVariant):
        return KronLinear(variant.factors())
    if len(variant) == 2:
        return LowRankLinear(dequantize(variant[0]), dequantize(variant[1]))
    return linear_with(dequantize(variant[0]))


def compress(
    base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache | None = None
) -> torch.nn.Module:
    """A new model: `base` with every linear weight and the embeddings compressed as `plan` says."""
    # Share the block linears' weights instead of copying them: every one of them is replaced below.
    memo = {id(m.weight): m.weight for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    model = copy.deepcopy(base, memo)
    for gguf_name, path, variant in quantized_tensors(base, arch, plan, stats, cache):
        if gguf_name in ("token_embd", "output"):
            # Assigning .data keeps a tied output head pointing at the same (compressed) table.
            model.get_submodule(path).weight.data = dequantize(variant[0])
            continue
        parent, attr = path.rsplit(".", 1)
        model.get_submodule(parent).register_module(attr, _linear_from(variant))
    for i, block in enumerate(model.model.layers):
        ff = kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn"))
        if ff == 0:
            block.mlp = RemovedMLP()
        else:
            block.mlp.intermediate_size = ff
        if kept_kv_heads(arch, plan.choice(f"blk.{i}.attn")) == 0:
            block.self_attn = RemovedAttention()
    return model.eval()
