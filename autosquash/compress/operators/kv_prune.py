"""KV-group pruning: a block's attention keeps the `attn_keep_ratio` share of its KV heads, each with the
query heads that share it (0 removes the attention); groups ranked by their activation-aware importance at
the output projection."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import ChoiceField, Pruning, input_channel_importance, keep_channels, weight_of
from autosquash.models.arch import Arch
from autosquash.models.layers import RemovedAttention

_O = "self_attn.o_proj"


def kv_group_importance(o_weight: torch.Tensor, o_input_sq: torch.Tensor | None, n_kv_heads: int) -> torch.Tensor:
    """Score of each KV group (a KV head and the query heads that share it): the summed importance
    of its channels entering the output projection, scored like FFN channels."""
    return input_channel_importance(o_weight, o_input_sq).view(n_kv_heads, -1).sum(-1)


class KVPruning(Pruning):
    """Rows of q (query heads) and of k/v (KV heads) of the kept groups; o_proj keeps their input columns."""

    name = "kv_prune"
    what = "pruned attention"
    kind = "attn"
    kinds = ("attn",)
    module = "self_attn"
    removed = RemovedAttention
    fields = (ChoiceField("attn_keep_ratio", float, 1.0, {"ge": 0.0, "le": 1.0}),)

    def full(self, arch: Arch) -> int:
        return arch.n_kv_heads

    def kept(self, arch: Arch, choice) -> int:
        if choice.attn_keep_ratio == 0:
            return 0
        return max(1, min(arch.n_kv_heads, round(arch.n_kv_heads * choice.attn_keep_ratio)))

    def shapes(self, arch: Arch, kept: int) -> dict[str, tuple[int, int]]:
        h, kv = arch.hidden_size, kept * arch.head_dim
        q = kv * (arch.n_heads // arch.n_kv_heads)
        return {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q)}

    def importance(self, block, i: int, arch: Arch, stats: dict) -> torch.Tensor:
        o = weight_of(block, _O)
        return kv_group_importance(o, stats.get(f"model.layers.{i}.{_O}"), arch.n_kv_heads)

    def select(self, block, i: int, arch: Arch, kept: int, stats: dict) -> dict[str, tuple]:
        groups = keep_channels(self.importance(block, i, arch, stats), kept)
        d, per_group = arch.head_dim, arch.n_heads // arch.n_kv_heads
        # In host memory, as keep_channels gives the groups.
        kv_rows = (groups[:, None] * d + torch.arange(d, device="cpu")).flatten()
        q_rows = (groups[:, None] * per_group * d + torch.arange(per_group * d, device="cpu")).flatten()
        return {
            "attn_q": (q_rows, None),
            "attn_k": (kv_rows, None),
            "attn_v": (kv_rows, None),
            "attn_output": (None, q_rows),
        }

    def probe_swaps(self, block, i: int, arch: Arch, kept: int, stats: dict) -> dict:
        """o_proj with the pruned groups' input columns zeroed: the same function as pruning them."""
        w = weight_of(block, _O).clone()  # weight_of may be the base's own tensor
        width = w.shape[1] // arch.n_kv_heads  # o's input channels per KV group
        imp = self.importance(block, i, arch, stats).repeat_interleave(width)
        mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        if kept > 0:
            mask[imp.topk(kept * width).indices] = False
        w[:, mask] = 0
        return {f"model.layers.{i}.{_O}": w}


OPERATOR = KVPruning()
