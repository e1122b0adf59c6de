"""Search spaces: which per-group choices a study may sample, for one deployment target (DESIGN.md §2).

A group space lists options for every searched field of the compression operators (compress/operators);
each operator says which targets and sublayer kinds its fields may move off neutral on.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from autosquash.compress.operators import DECOMPOSITIONS, FIELDS, PRUNING, REGISTRY, SEARCHED_FIELDS
from autosquash.compress.operators.base import ChoiceField
from autosquash.compress.plan import SUBLAYERS, LayerChoice, Plan, Target
from autosquash.formats.gguf_types import searchable_type
from autosquash.models.arch import Arch
from autosquash.yaml_io import load_yaml_model

_SEARCHED: tuple[ChoiceField, ...] = tuple(f for f in FIELDS if f.searched)
_NEUTRAL = {f.name: f.neutral for f in _SEARCHED}


def _check_options(f: ChoiceField):
    """A validator of a field's option list: each option as a layer choice would take it, normalised."""

    def check(cls, values: list) -> list:
        out = []
        for v in values:
            if f.validate_option is not None:
                v = f.validate_option(v)
            try:
                LayerChoice(**{f.name: v})
            except ValidationError as e:
                raise ValueError(f"option {v!r}: {e.errors()[0]['msg']}") from None
            out.append(v)
        return out

    return field_validator(f.name)(check)


def _space_field(f: ChoiceField) -> tuple[Any, Any]:
    if not f.space_default:
        return list[f.annotation], Field(min_length=1)
    return list[f.annotation], Field(default_factory=lambda n=f.neutral: [n], min_length=1)


GroupSpace = create_model(
    "GroupSpace",
    __config__=ConfigDict(frozen=True, extra="forbid"),
    __doc__="Choices for one kind of layer group (every block's attention, or every block's FFN).",
    __validators__={f"_check_{f.name}": _check_options(f) for f in _SEARCHED},
    **{f.name: _space_field(f) for f in _SEARCHED},
)


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
    # Kinds whose linears each take their own type from the kind's `quant` options, as llama.cpp's --target-size
    # allocator chooses per tensor: one parameter per linear (`blk.<i>.ffn.ffn_down.quant`) instead of one per group.
    per_tensor: list[Literal["attn", "ffn"]] = Field(default_factory=list)

    @field_validator("baselines", "embed_quant")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        return [searchable_type(t) for t in v]

    @model_validator(mode="after")
    def _deployable(self) -> SearchSpace:
        for kind, _ in SUBLAYERS:
            values = getattr(self, kind).model_dump()
            for op in REGISTRY:
                op.check_space(self.target, kind, values)
            on = [f.name for op in DECOMPOSITIONS for f in op.fields if any(v != f.neutral for v in values[f.name])]
            if len(on) > 1:
                raise ValueError(f"{kind}: a group searches one decomposition, not {' and '.join(on)}")
        for b in self.baselines:
            for kind, _ in SUBLAYERS:
                if b not in getattr(self, kind).quant:
                    raise ValueError(f"baseline {b} is not among {kind}.quant, so the study cannot sample it")
        if self.baselines:
            for kind, _ in SUBLAYERS:
                space = getattr(self, kind)
                for f in _SEARCHED:
                    if f.space_default and f.neutral not in getattr(space, f.name):
                        raise ValueError(
                            f"{kind}.{f.name} must include {f.neutral!r} (the operator off) for the uniform baselines"
                        )
        return self

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search-space YAML file."""
        return load_yaml_model(cls, path)

    def pruned(self) -> list[str]:
        """The structured-pruning fields this space moves off their neutral value, as `kind.field`."""
        return [
            f"{kind}.{f.name}"
            for kind, _ in SUBLAYERS
            for op in PRUNING.values()
            for f in op.fields
            if any(v != f.neutral for v in getattr(getattr(self, kind), f.name, [f.neutral]))
        ]

    def without_pruning(self) -> SearchSpace:
        """This space with every structured-pruning field (those `pruned` lists) held at its neutral value,
        named `<name>-no-pruning`: for a family whose llama.cpp graph cannot take per-block shapes."""
        neutral = {f.name: [f.neutral] for op in PRUNING.values() for f in op.fields}
        data = self.model_dump()
        for kind, _ in SUBLAYERS:
            data[kind] |= {k: v for k, v in neutral.items() if k in data[kind]}
        return SearchSpace.model_validate({**data, "name": f"{self.name}-no-pruning"})

    def _dims(self, arch: Arch) -> list[tuple[str, str, list]]:
        dims = []
        for i in range(arch.n_layers):
            for kind, linears in SUBLAYERS:
                space = getattr(self, kind)
                for field in SEARCHED_FIELDS:
                    if field == "quant" and kind in self.per_tensor:
                        dims += [(f"blk.{i}.{kind}", f"{name}.quant", space.quant) for name, _ in linears]
                    else:
                        dims.append((f"blk.{i}.{kind}", field, getattr(space, field)))
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
            groups={g: layer_choice(g.rsplit(".", 1)[1], v) for g, v in values.items()},
        )

    def options(self, arch: Arch) -> dict[str, list]:
        """The choices `sample` asks a trial for, by Optuna parameter name (those with one option are not asked)."""
        asked = {f"{group}.{field}": choices for group, field, choices in self._dims(arch) if len(choices) > 1}
        return asked | ({"embed_quant": self.embed_quant} if len(self.embed_quant) > 1 else {})

    def plan_count(self, arch: Arch) -> int:
        """How many distinct plans the space holds for `arch`."""
        return math.prod(len(choices) for choices in self.options(arch).values())

    def holds(self, key: tuple, arch: Arch) -> bool:
        """Whether a trial's `params_key` is a plan of this space (a study resumed with --force mixes spaces)."""
        options = self.options(arch)
        values = dict(key)
        return values.keys() == options.keys() and all(v in map(str, options[k]) for k, v in values.items())

    def untried_params(self, arch: Arch, tried: set[tuple], rng: random.Random) -> dict[str, object] | None:
        """The parameters of a plan whose `params_key` is not in `tried`, from a random place in the space on;
        None when every plan has been tried."""
        options = list(self.options(arch).items())
        count = self.plan_count(arch)
        start = rng.randrange(count)
        for step in range(min(count, len(tried) + 1)):  # of len(tried) + 1 plans in a row one is untried
            index, params = (start + step) % count, {}
            for name, choices in options:  # the index in mixed radix: one digit per parameter
                index, digit = divmod(index, len(choices))
                params[name] = choices[digit]
            if params_key(params) not in tried:
                return params
        return None

    def params_of(self, plan: Plan, arch: Arch) -> dict[str, object]:
        """The Optuna parameters `sample` makes `plan` from (for a plan of this space)."""
        params: dict[str, object] = {}
        for group, field, choices in self._dims(arch):
            if len(choices) > 1:
                c = plan.choice(group)
                tensor = field.removesuffix(".quant")
                params[f"{group}.{field}"] = c.quant_for(tensor) if tensor != field else getattr(c, field)
        if len(self.embed_quant) > 1:
            params["embed_quant"] = plan.embed_quant
        return params

    def baseline_params(self, arch: Arch, quant: str) -> dict[str, object]:
        """Optuna parameters of the uniform plan with every group in `quant`, for `enqueue_trial`."""
        params: dict[str, object] = {}
        for group, field, choices in self._dims(arch):
            if len(choices) > 1:
                params[f"{group}.{field}"] = quant if field.endswith("quant") else _NEUTRAL[field]
        if len(self.embed_quant) > 1:
            params["embed_quant"] = self.embed_quant[0]
        return params


def layer_choice(kind: str, values: dict[str, Any]) -> LayerChoice:
    """The layer choice of one `kind` group's searched values; per-tensor types (`<tensor>.quant`) become `quant`
    (the kind's first linear's) and `tensor_quant` (the others that differ from it)."""
    values = dict(values)
    types = {k.removesuffix(".quant"): values.pop(k) for k in [k for k in values if k.endswith(".quant")]}
    if types:
        first = types[dict(SUBLAYERS)[kind][0][0]]
        values |= {"quant": first, "tensor_quant": {t: q for t, q in types.items() if q != first}}
    return LayerChoice(**values)


def params_key(params: dict) -> tuple:
    """A trial's parameters as one hashable value: two trials with equal keys evaluate the same plan."""
    return tuple(sorted((k, str(v)) for k, v in params.items()))
