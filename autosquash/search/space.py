"""Search spaces: which per-group choices a study may sample, for one deployment target (DESIGN.md §2)."""

from __future__ import annotations

from pathlib import Path

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autosquash.compress.gguf_types import SEARCHABLE_TYPES, tensor_type
from autosquash.compress.plan import LayerChoice, Plan, Target
from autosquash.models.arch import Arch
from autosquash.yaml_io import load_yaml_model


def _types(v: list[str]) -> list[str]:
    names = [tensor_type(t).name for t in v]
    for n in names:
        if n not in SEARCHABLE_TYPES:
            raise ValueError(f"{n} is not a searchable type; expected one of {', '.join(SEARCHABLE_TYPES)}")
    return names


class GroupSpace(BaseModel):
    """Choices for one kind of layer group (every block's attention, or every block's FFN)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quant: list[str] = Field(min_length=1)
    ffn_keep_ratio: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    attn_keep_ratio: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    rank_ratio: list[float] = Field(default_factory=lambda: [0.0], min_length=1)
    kron_rank: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("quant")
    @classmethod
    def _quant(cls, v: list[str]) -> list[str]:
        return _types(v)

    @field_validator("ffn_keep_ratio", "attn_keep_ratio")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 <= r <= 1 for r in v):
            raise ValueError("every keep ratio must lie in [0, 1] (0 removes the sublayer)")
        return v

    @field_validator("rank_ratio")
    @classmethod
    def _ranks(cls, v: list[float]) -> list[float]:
        if any(not 0 <= r < 1 for r in v):
            raise ValueError("every rank_ratio must lie in [0, 1) (0 = no decomposition)")
        return v


class SearchSpace(BaseModel):
    """A search-space file: target, per-group choices and the uniform baselines that seed the study."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    target: Target
    # Choices for the token embedding (the output head too when tied); baselines use the first.
    embed_quant: list[str] = Field(default_factory=lambda: ["Q8_0"], min_length=1)
    attn: GroupSpace
    ffn: GroupSpace
    baselines: list[str] = Field(default_factory=list)

    @field_validator("baselines", "embed_quant")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        return _types(v)

    @model_validator(mode="after")
    def _deployable(self) -> SearchSpace:
        if self.attn.ffn_keep_ratio != [1.0]:
            raise ValueError("attn.ffn_keep_ratio: attention groups have no FFN channels to prune")
        if self.ffn.attn_keep_ratio != [1.0]:
            raise ValueError("ffn.attn_keep_ratio: FFN groups have no attention heads to prune")
        if self.target == "gguf" and 0.0 in self.ffn.ffn_keep_ratio:
            raise ValueError(
                "ffn.ffn_keep_ratio: a gguf target cannot remove an FFN alone (llama.cpp's deci architecture "
                "drops that block's attention too); use target: torch"
            )
        for g in (self.attn, self.ffn):
            if self.target == "gguf" and (g.rank_ratio != [0.0] or g.kron_rank != [0]):
                raise ValueError("rank_ratio/kron_rank: a gguf target cannot hold decompositions; use target: torch")
            if any(k < 0 for k in g.kron_rank):
                raise ValueError("kron_rank: every choice must be 0 (none) or a positive number of terms")
            if max(g.rank_ratio) > 0 and max(g.kron_rank) > 0:
                raise ValueError("a group searches SVD (rank_ratio) or Kronecker (kron_rank) ranks, not both")
        for b in self.baselines:
            for g, space in (("attn", self.attn), ("ffn", self.ffn)):
                if b not in space.quant:
                    raise ValueError(f"baseline {b} is not among {g}.quant, so the study cannot sample it")
        if (1.0 not in self.ffn.ffn_keep_ratio or 1.0 not in self.attn.attn_keep_ratio) and self.baselines:
            raise ValueError("ffn_keep_ratio and attn_keep_ratio must include 1.0 for the uniform baselines")
        for g in (self.attn, self.ffn):
            if (0.0 not in g.rank_ratio or 0 not in g.kron_rank) and self.baselines:
                raise ValueError("rank_ratio and kron_rank must include 0 for the uniform baselines")
        return self

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search-space YAML file."""
        return load_yaml_model(cls, path)

    def _dims(self, arch: Arch) -> list[tuple[str, str, list]]:
        dims = []
        for i in range(arch.n_layers):
            for g, space in (("attn", self.attn), ("ffn", self.ffn)):
                for field in ("quant", "ffn_keep_ratio", "attn_keep_ratio", "rank_ratio", "kron_rank"):
                    dims.append((f"blk.{i}.{g}", field, getattr(space, field)))
        return dims

    def sample(self, trial: optuna.Trial, arch: Arch) -> Plan:
        """Ask `trial` for every choice with more than one option, and build the plan."""
        values: dict[str, dict] = {}
        for group, field, choices in self._dims(arch):
            v = trial.suggest_categorical(f"{group}.{field}", choices) if len(choices) > 1 else choices[0]
            values.setdefault(group, {})[field] = v
        embed = self.embed_quant
        return Plan(
            target=self.target,
            embed_quant=trial.suggest_categorical("embed_quant", embed) if len(embed) > 1 else embed[0],
            groups={g: LayerChoice(**v) for g, v in values.items()},
        )

    def baseline_params(self, arch: Arch, quant: str) -> dict[str, object]:
        """Optuna parameters of the uniform plan with every group in `quant`, for `enqueue_trial`."""
        params: dict[str, object] = {}
        for group, field, choices in self._dims(arch):
            if len(choices) > 1:
                params[f"{group}.{field}"] = {"quant": quant, "rank_ratio": 0.0, "kron_rank": 0}.get(field, 1.0)
        if len(self.embed_quant) > 1:
            params["embed_quant"] = self.embed_quant[0]
        return params
