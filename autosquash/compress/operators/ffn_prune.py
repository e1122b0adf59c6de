"""FFN-channel pruning: a block's FFN keeps the `ffn_keep_ratio` share of its channels (0 removes it), the
channels of highest activation-aware importance (Wanda-style, on whole channels; see base.py)."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import ChoiceField, Pruning, input_channel_importance, keep_channels, weight_of
from autosquash.models.arch import Arch
from autosquash.models.layers import RemovedMLP

_DOWN = "mlp.down_proj"


class FFNPruning(Pruning):
    """Channels enter down_proj as its input columns and leave gate/up as their rows; widths stay multiples
    of 32 so every row keeps whole quantization blocks."""

    name = "ffn_prune"
    what = "an FFN removed alone (llama.cpp's deci architecture drops that block's attention too)"
    kind = "ffn"
    kinds = ("ffn",)
    module = "mlp"
    removed = RemovedMLP
    fields = (ChoiceField("ffn_keep_ratio", float, 1.0, {"ge": 0.0, "le": 1.0}),)

    def check_space(self, target: str, kind: str, values: dict[str, list]) -> None:
        super().check_space(target, kind, values)
        if target == "gguf" and 0.0 in values.get("ffn_keep_ratio", []):
            raise ValueError(
                "ffn.ffn_keep_ratio: a gguf target cannot remove an FFN alone (llama.cpp's deci architecture "
                "drops that block's attention too); use target: torch"
            )

    def full(self, arch: Arch) -> int:
        return arch.intermediate_size

    def kept(self, arch: Arch, choice) -> int:
        if choice.ffn_keep_ratio == 0:
            return 0
        keep = round(arch.intermediate_size * choice.ffn_keep_ratio / 32) * 32
        return max(32, min(arch.intermediate_size, keep))

    def shapes(self, arch: Arch, kept: int) -> dict[str, tuple[int, int]]:
        h = arch.hidden_size
        return {"ffn_gate": (kept, h), "ffn_up": (kept, h), "ffn_down": (h, kept)}

    def importance(self, block, i: int, arch: Arch, stats: dict) -> torch.Tensor:
        return input_channel_importance(weight_of(block, _DOWN), stats.get(f"model.layers.{i}.{_DOWN}"))

    def select(self, block, i: int, arch: Arch, kept: int, stats: dict) -> dict[str, tuple]:
        idx = keep_channels(self.importance(block, i, arch, stats), kept)
        return {"ffn_gate": (idx, None), "ffn_up": (idx, None), "ffn_down": (None, idx)}

    def resize(self, sublayer: torch.nn.Module, kept: int) -> None:
        sublayer.intermediate_size = kept

    def probe_swaps(self, block, i: int, arch: Arch, kept: int, stats: dict) -> dict:
        """down_proj with the pruned channels' columns zeroed: the same function as pruning them."""
        w = weight_of(block, _DOWN).clone()  # weight_of may be the base's own tensor
        mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        if kept > 0:
            mask[self.importance(block, i, arch, stats).topk(kept).indices] = False
        w[:, mask] = 0
        return {f"model.layers.{i}.{_DOWN}": w}


OPERATOR = FFNPruning()
