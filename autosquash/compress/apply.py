"""Apply a plan to a base model: prune, then decompose, then quantize, layer by layer.

Each compressed tensor is computed once per (layer, choice) and reused from a variant cache.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from autosquash.compress.calibrate import Stats
from autosquash.compress.gguf_types import legal_type
from autosquash.compress.lowrank import LowRankLinear, svd_factors
from autosquash.compress.plan import ATTN_LINEARS, FFN_LINEARS, Plan, factor_rank, kept_ffn_channels
from autosquash.compress.prune import ffn_channel_importance, keep_channels
from autosquash.compress.quant import fake_quantize
from autosquash.models.arch import Arch


@dataclass
class VariantCache:
    """Least-recently-used store of compressed tensors, bounded in bytes."""

    max_bytes: int = 2 << 30
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        self._items: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The cached value of `key`, made (and cached) on a miss."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()
        size = sum(t.numel() * t.element_size() for t in value)
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)
        return value


def _compress_linear(
    weight: torch.Tensor, quant: str, rank: int, input_sq: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """One linear's deployed weights (one matrix, or the two SVD factors), on their GGUF grid."""
    if rank == 0:
        return (fake_quantize(weight, legal_type(quant, weight.shape[1]), input_sq),)
    a, b = svd_factors(weight, rank, input_sq)
    return (
        fake_quantize(a, legal_type(quant, a.shape[1]), input_sq),
        fake_quantize(b, legal_type(quant, b.shape[1]), None),
    )


def _ffn_keep(down_weight: torch.Tensor, down_sq: torch.Tensor | None, keep: int) -> tuple[torch.Tensor]:
    return (keep_channels(ffn_channel_importance(down_weight, down_sq), keep),)


def _linear_from(weights: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    if len(weights) == 2:
        return LowRankLinear(weights[0].clone(), weights[1].clone())
    w = weights[0]
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    return layer


def compress(base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache | None = None):
    """A new model: `base` with every linear weight and the embeddings compressed as `plan` says."""
    cache = cache or VariantCache(max_bytes=0)
    # Share the block linears' weights instead of copying them: every one of them is replaced below.
    memo = {id(m.weight): m.weight for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    model = copy.deepcopy(base, memo)
    blocks = model.model.layers
    base_blocks = base.model.layers
    for i in range(arch.n_layers):
        ffn = plan.choice(f"blk.{i}.ffn")
        ff = kept_ffn_channels(arch, ffn)
        down_sq = stats.get(f"model.layers.{i}.mlp.down_proj")
        (idx,) = cache.get(
            ("ffn_keep", i, ff), partial(_ffn_keep, base_blocks[i].mlp.down_proj.weight.data, down_sq, ff)
        )
        for group, linears in (("attn", ATTN_LINEARS), ("ffn", FFN_LINEARS)):
            choice = plan.choice(f"blk.{i}.{group}")
            for gguf_name, path in linears:
                parent_path, attr = path.split(".")
                base_module = getattr(getattr(base_blocks[i], parent_path), attr)
                w = base_module.weight.data
                input_sq = stats.get(f"model.layers.{i}.{path}")
                if group == "ffn" and ff < arch.intermediate_size:
                    if gguf_name == "ffn_down":
                        w = w[:, idx]
                        input_sq = input_sq[idx] if input_sq is not None else None
                    else:
                        w = w[idx]
                rank = factor_rank(w.shape[0], w.shape[1], choice.rank_ratio)
                quant = choice.quant_for(gguf_name)
                key = (i, gguf_name, ff, rank, legal_type(quant, w.shape[1]))
                weights = cache.get(key, lambda w=w, q=quant, r=rank, s=input_sq: _compress_linear(w, q, r, s))
                setattr(getattr(blocks[i], parent_path), attr, _linear_from(weights))
        if ff < arch.intermediate_size:
            blocks[i].mlp.intermediate_size = ff
    _compress_embeddings(model, base, arch, plan, cache)
    return model.eval()


def _compress_embeddings(model, base, arch: Arch, plan: Plan, cache: VariantCache) -> None:
    embed_type = legal_type(plan.embed_quant, arch.hidden_size)
    (emb,) = cache.get(
        ("token_embd", embed_type), lambda: (fake_quantize(base.model.embed_tokens.weight.data, embed_type),)
    )
    # Assigning .data keeps a tied output head pointing at the same (compressed) table.
    model.model.embed_tokens.weight.data = emb.clone()
    if not arch.tied_embeddings:
        out_type = legal_type(plan.output_quant or plan.embed_quant, arch.hidden_size)
        (out,) = cache.get(("output", out_type), lambda: (fake_quantize(base.lm_head.weight.data, out_type),))
        model.lm_head.weight.data = out.clone()
