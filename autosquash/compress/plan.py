"""A plan is data: the per-layer-group compression choices of one trial, and the tensors it deploys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autosquash.compress.gguf_types import legal_type, legal_type_or_f16, tensor_type
from autosquash.compress.kronecker import kron_macs, kron_shape
from autosquash.models.arch import Arch

Target = Literal["gguf", "torch"]

# Linear weights of a block, by group, with their GGUF names and Hugging Face module paths.
ATTN_LINEARS: tuple[tuple[str, str], ...] = (
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
)
FFN_LINEARS: tuple[tuple[str, str], ...] = (
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
)
# Low-rank factors are stored in whole quantization blocks, so ranks are rounded to this multiple.
RANK_MULTIPLE = 32


class LayerChoice(BaseModel):
    """What one layer group (a block's attention or its FFN) gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quant: str = "F16"
    # Share of FFN channels kept (0 removes the block's FFN).
    ffn_keep_ratio: float = Field(1.0, ge=0.0, le=1.0)
    # Share of KV-head groups kept, each with its query heads (0 removes the block's attention).
    attn_keep_ratio: float = Field(1.0, ge=0.0, le=1.0)
    rank_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    # Terms of a permuted Kronecker decomposition (TQCompressor) of each linear; 0 = none.
    kron_rank: int = Field(0, ge=0)
    # Per-tensor exceptions to `quant`, by GGUF short name, e.g. {"attn_v": "Q6_K"} as in Q4_K_M.
    tensor_quant: dict[str, str] = Field(default_factory=dict)

    @field_validator("quant")
    @classmethod
    def _known_type(cls, v: str) -> str:
        return tensor_type(v).name

    @field_validator("tensor_quant")
    @classmethod
    def _known_types(cls, v: dict[str, str]) -> dict[str, str]:
        known = {n for n, _ in ATTN_LINEARS + FFN_LINEARS}
        for name in v:
            if name not in known:
                raise ValueError(f"unknown tensor {name!r}; expected one of {', '.join(sorted(known))}")
        return {k: tensor_type(t).name for k, t in v.items()}

    @model_validator(mode="after")
    def _one_decomposition(self) -> LayerChoice:
        if self.rank_ratio > 0 and self.kron_rank > 0:
            raise ValueError("choose rank_ratio (SVD) or kron_rank (Kronecker), not both")
        return self

    def quant_for(self, tensor: str) -> str:
        """The GGUF type asked for tensor `tensor` (a short name such as 'attn_v')."""
        return self.tensor_quant.get(tensor, self.quant)


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
        groups = {f"blk.{i}.{g}": c for i in range(arch.n_layers) for g in ("attn", "ffn")}
        return cls(target=target, embed_quant=embed_quant or quant, groups=groups)

    def flat_params(self) -> dict[str, str]:
        """The plan as flat key/value strings, for tracking systems."""
        out = {"target": self.target, "embed_quant": self.embed_quant, "output_quant": str(self.output_quant)}
        for g, c in self.groups.items():
            for k, v in c.model_dump().items():
                if k == "tensor_quant":
                    out.update({f"{g}.{t}.quant": q for t, q in v.items()})
                else:
                    out[f"{g}.{k}"] = str(v)
        return out


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as deployed: its GGUF name, torch shape (out, in), GGUF type and work per token."""

    name: str
    shape: tuple[int, ...]
    type: str
    macs_per_token: int
    lookup: bool = False  # an embedding table: decoding one token reads one row of it

    @property
    def nbytes(self) -> int:
        return tensor_type(self.type).nbytes(self.shape)

    @property
    def bytes_read_per_token(self) -> float:
        return self.nbytes / self.shape[0] if self.lookup else float(self.nbytes)


def kept_ffn_channels(arch: Arch, choice: LayerChoice) -> int:
    """FFN width after pruning (0: removed), a multiple of 32 so every row stays block-aligned."""
    if choice.ffn_keep_ratio == 0:
        return 0
    keep = round(arch.intermediate_size * choice.ffn_keep_ratio / 32) * 32
    return max(32, min(arch.intermediate_size, keep))


def kept_kv_heads(arch: Arch, choice: LayerChoice) -> int:
    """KV heads left after pruning whole KV groups (0: the attention sublayer is removed)."""
    if choice.attn_keep_ratio == 0:
        return 0
    return max(1, min(arch.n_kv_heads, round(arch.n_kv_heads * choice.attn_keep_ratio)))


def kv_heads_per_layer(arch: Arch, plan: Plan) -> list[int]:
    """KV heads of every block as deployed: what the KV cache holds per position."""
    return [kept_kv_heads(arch, plan.choice(f"blk.{i}.attn")) for i in range(arch.n_layers)]


def factor_rank(out_features: int, in_features: int, rank_ratio: float) -> int:
    """Rank of a low-rank factorisation, or 0 when none is asked for or it would not save storage."""
    if rank_ratio <= 0:
        return 0
    r = max(RANK_MULTIPLE, round(rank_ratio * min(out_features, in_features) / RANK_MULTIPLE) * RANK_MULTIPLE)
    return r if r * (out_features + in_features) < out_features * in_features else 0


def kron_terms(out_features: int, in_features: int, kron_rank: int) -> int:
    """Kronecker terms actually used: 0 when none is asked for or the factors would not save storage."""
    if kron_rank <= 0:
        return 0
    m1, m2, n1, n2 = kron_shape(out_features, in_features)
    r = min(kron_rank, m1 * n1, m2 * n2)
    return r if r * (m1 * n1 + m2 * n2) < out_features * in_features else 0


def _kron_linear(name: str, out_f: int, in_f: int, quant: str, r: int) -> list[TensorSpec]:
    m1, m2, n1, n2 = kron_shape(out_f, in_f)
    macs = kron_macs((m1, m2, n1, n2), r)
    # Factors are stored flattened, one row per term, so their rows hold whole quantization blocks.
    return [
        TensorSpec(f"{name}.kron_a", (r, m1 * n1), legal_type_or_f16(quant, m1 * n1), macs),
        TensorSpec(f"{name}.kron_b", (r, m2 * n2), legal_type_or_f16(quant, m2 * n2), 0),
        TensorSpec(f"{name}.row_perm", (out_f,), "I16", 0),
        TensorSpec(f"{name}.col_perm", (in_f,), "I16", 0),
        TensorSpec(f"{name}.col_scale", (in_f,), "F32", in_f),
    ]


def _linear(name: str, out_f: int, in_f: int, quant: str, rank: int) -> list[TensorSpec]:
    if rank == 0:
        return [TensorSpec(f"{name}.weight", (out_f, in_f), legal_type_or_f16(quant, in_f), out_f * in_f)]
    # W ≈ B @ A with A: (rank, in), B: (out, rank).
    return [
        TensorSpec(f"{name}.lr_a", (rank, in_f), legal_type_or_f16(quant, in_f), rank * in_f),
        TensorSpec(f"{name}.lr_b", (out_f, rank), legal_type_or_f16(quant, rank), out_f * rank),
    ]


def deployed_tensors(arch: Arch, plan: Plan) -> list[TensorSpec]:
    """Every tensor the plan deploys, with its legal GGUF type; what the cost model prices."""
    h = arch.hidden_size
    embed_type = legal_type(plan.embed_quant, h)
    tensors = [TensorSpec("token_embd.weight", (arch.vocab_size, h), embed_type, 0, lookup=True)]
    group_size = arch.n_heads // arch.n_kv_heads
    for i in range(arch.n_layers):
        attn, ffn = plan.choice(f"blk.{i}.attn"), plan.choice(f"blk.{i}.ffn")
        kv = kept_kv_heads(arch, attn) * arch.head_dim
        q = kv * group_size
        ff = kept_ffn_channels(arch, ffn)
        for choice, width, norm, linears, shapes in (
            (
                attn,
                kv,
                "attn_norm",
                ATTN_LINEARS,
                {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q)},
            ),
            (ffn, ff, "ffn_norm", FFN_LINEARS, {"ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}),
        ):
            if width == 0:
                continue  # a removed sublayer deploys nothing, not even its norm
            tensors.append(TensorSpec(f"blk.{i}.{norm}.weight", (h,), "F32", 0))
            for gguf_name, _ in linears:
                o, n = shapes[gguf_name]
                quant = choice.quant_for(gguf_name)
                kron = kron_terms(o, n, choice.kron_rank)
                if kron:
                    tensors += _kron_linear(f"blk.{i}.{gguf_name}", o, n, quant, kron)
                else:
                    tensors += _linear(f"blk.{i}.{gguf_name}", o, n, quant, factor_rank(o, n, choice.rank_ratio))
    tensors.append(TensorSpec("output_norm.weight", (h,), "F32", 0))
    if arch.tied_embeddings:
        # The output head reuses token_embd: every token multiplies by the whole table.
        tensors[0] = TensorSpec("token_embd.weight", (arch.vocab_size, h), embed_type, arch.vocab_size * h)
    else:
        out_type = legal_type(plan.output_quant or plan.embed_quant, h)
        tensors.append(TensorSpec("output.weight", (arch.vocab_size, h), out_type, arch.vocab_size * h))
    return tensors
