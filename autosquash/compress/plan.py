"""A plan is data: the per-layer-group compression choices of one trial, and the tensors it deploys.

A layer choice has one field per operator field (compress/operators), so a new operator's fields appear in
plans, plan files and search spaces without touching this module.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from autosquash.compress.operators import DECOMPOSITIONS, FIELDS, PRUNING, deploy_linear
from autosquash.compress.operators.base import ChoiceField, TensorSpec
from autosquash.errors import AutosquashError
from autosquash.formats.gguf_types import legal_type, tensor_type
from autosquash.models.arch import ATTN_LINEARS, FFN_LINEARS, Arch

Target = Literal["gguf", "torch"]
SUBLAYERS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (("attn", ATTN_LINEARS), ("ffn", FFN_LINEARS))

__all__ = [
    "LayerChoice",
    "Plan",
    "TensorSpec",
    "check_plan",
    "deployed_tensors",
    "kept_ffn_channels",
    "kept_kv_heads",
]


class _Choice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def quant_for(self, tensor: str) -> str:
        """The GGUF type asked for tensor `tensor` (a short name such as 'attn_v')."""
        return self.tensor_quant.get(tensor, self.quant)

    @model_validator(mode="after")
    def _one_decomposition(self) -> Any:
        on = [f.name for op in DECOMPOSITIONS if not op.is_neutral(self) for f in op.fields]
        if len(on) > 1:
            raise ValueError(f"choose one decomposition per group: {' or '.join(on)}, not both")
        return self


def _pydantic_field(f: ChoiceField) -> tuple[Any, Any]:
    if isinstance(f.neutral, dict | list):
        return f.annotation, Field(default_factory=lambda n=f.neutral: copy.deepcopy(n))
    return f.annotation, Field(f.neutral, **f.bounds)


def _validator(f: ChoiceField):
    return field_validator(f.name)(lambda cls, v: f.validate(v))


LayerChoice = create_model(
    "LayerChoice",
    __base__=_Choice,
    __doc__="What one layer group (a block's attention or its FFN) gets: one field per operator field.",
    __validators__={f"_check_{f.name}": _validator(f) for f in FIELDS if f.validate},
    # Searched fields first (as search spaces list them), then the per-tensor exceptions and the like.
    **{f.name: _pydantic_field(f) for f in sorted(FIELDS, key=lambda f: not f.searched)},
)


class Plan(BaseModel):
    """Per-group choices for a whole model; groups are named `blk.<i>.attn` and `blk.<i>.ffn`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: Target = "gguf"
    embed_quant: str = "Q8_0"
    # The output head's type when it is not tied to the embeddings (None: same as embed_quant).
    output_quant: str | None = None
    groups: dict[str, LayerChoice] = Field(default_factory=dict)

    @field_validator("embed_quant", "output_quant")
    @classmethod
    def _known_type(cls, v: str | None) -> str | None:
        return None if v is None else tensor_type(v).name

    def choice(self, group: str) -> LayerChoice:
        """The choice for `group`; groups a plan leaves out stay at F16, unpruned, full rank."""
        return self.groups.get(group, LayerChoice())

    @classmethod
    def uniform(cls, arch: Arch, quant: str, target: Target = "gguf", embed_quant: str | None = None) -> Plan:
        """Every linear weight in `quant` (embeddings too, unless `embed_quant` is given)."""
        c = LayerChoice(quant=quant)
        groups = {f"blk.{i}.{g}": c for i in range(arch.n_layers) for g, _ in SUBLAYERS}
        return cls(target=target, embed_quant=embed_quant or quant, groups=groups)

    def flat_params(self) -> dict[str, str]:
        """The plan as flat key/value strings, for tracking systems."""
        out = {"target": self.target, "embed_quant": self.embed_quant, "output_quant": str(self.output_quant)}
        for g, c in self.groups.items():
            for k, v in c.model_dump().items():
                if isinstance(v, dict):  # per-tensor exceptions: one key per tensor
                    out.update({f"{g}.{t}.{k.removeprefix('tensor_')}": q for t, q in v.items()})
                else:
                    out[f"{g}.{k}"] = str(v)
        return out


def check_plan(plan: Plan, arch: Arch, source: str) -> Plan:
    """`plan`, refused in one line (naming `source`) unless it names a choice for every group of `arch` and no
    other (a plan made for another model: a group it leaves out would deploy uncompressed, unnoticed), with
    per-tensor types only for linears its groups hold. Plans a search writes always name every group."""
    kinds = {kind: {name for name, _ in linears} for kind, linears in SUBLAYERS}
    for group, choice in plan.groups.items():
        parts = group.split(".")
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in kinds:
            raise AutosquashError(f"{source}: group {group!r} is not of the form blk.<i>.attn or blk.<i>.ffn")
        if int(parts[1]) >= arch.n_layers:
            raise AutosquashError(
                f"{source}: group {group!r} is past the model's {arch.n_layers} blocks (a plan for another model?)"
            )
        stray = set(choice.tensor_quant) - kinds[parts[2]]
        if stray:
            raise AutosquashError(f"{source}: {group} names tensors of another sublayer: {', '.join(sorted(stray))}")
    groups = [f"blk.{i}.{kind}" for i in range(arch.n_layers) for kind, _ in SUBLAYERS]
    missing = [g for g in groups if g not in plan.groups]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise AutosquashError(
            f"{source}: no choice for {len(missing)} of the model's {len(groups)} groups ({shown}); a plan names "
            f"blk.<i>.attn and blk.<i>.ffn for each of its model's {arch.n_layers} blocks (a plan for another model?)"
        )
    return plan


def kept_ffn_channels(arch: Arch, choice: LayerChoice) -> int:
    """FFN width after pruning (0: removed), a multiple of 32 so every row stays block-aligned."""
    return PRUNING["ffn"].kept(arch, choice)


def kept_kv_heads(arch: Arch, choice: LayerChoice) -> int:
    """KV heads left after pruning whole KV groups (0: the attention sublayer is removed)."""
    return PRUNING["attn"].kept(arch, choice)


def kv_heads_per_layer(arch: Arch, plan: Plan) -> list[int]:
    """KV heads of every block as deployed: what the KV cache holds per position."""
    return [kept_kv_heads(arch, plan.choice(f"blk.{i}.attn")) for i in range(arch.n_layers)]


def sublayer_tensors(arch: Arch, i: int, kind: str, choice: LayerChoice) -> list[TensorSpec]:
    """The tensors block `i`'s `kind` sublayer deploys under `choice`: its norm and its linears (none when
    pruning removes it)."""
    op = PRUNING[kind]
    kept = op.kept(arch, choice)
    if kept == 0:
        return []  # a removed sublayer deploys nothing, not even its norm
    shapes = op.shapes(arch, kept)
    tensors = [TensorSpec(f"blk.{i}.{name}.weight", (size,), "F32", 0) for name, _, size in arch.norms(kind)]
    for gguf_name, _ in dict(SUBLAYERS)[kind]:
        out_f, in_f = shapes[gguf_name]
        tensors += deploy_linear(f"blk.{i}.{gguf_name}", out_f, in_f, choice).tensors
        if gguf_name in arch.biased:  # kept whole in F32, its pruned rows dropped with the weight's
            tensors.append(TensorSpec(f"blk.{i}.{gguf_name}.bias", (out_f,), "F32", 0))
    return tensors


def deployed_tensors(arch: Arch, plan: Plan) -> list[TensorSpec]:
    """Every tensor the plan deploys, with its legal GGUF type; what the cost model prices."""
    h = arch.hidden_size
    embed_type = legal_type(plan.embed_quant, h)
    tensors = [TensorSpec("token_embd.weight", (arch.vocab_size, h), embed_type, 0, lookup=True)]
    for i in range(arch.n_layers):
        for kind, _ in SUBLAYERS:
            tensors += sublayer_tensors(arch, i, kind, plan.choice(f"blk.{i}.{kind}"))
    tensors.append(TensorSpec("output_norm.weight", (h,), "F32", 0))
    if arch.tied_embeddings:
        # The output head reuses token_embd: every token multiplies by the whole table.
        tensors[0] = TensorSpec("token_embd.weight", (arch.vocab_size, h), embed_type, arch.vocab_size * h)
    else:
        out_type = legal_type(plan.output_quant or plan.embed_quant, h)
        tensors.append(TensorSpec("output.weight", (arch.vocab_size, h), out_type, arch.vocab_size * h))
    return tensors
