"""What every compression operator declares: the choice fields it adds, and, by its kind, how it shapes or
stores a layer. The registry (this package's __init__) lists the operators; plan, apply, the search space,
the sensitivity model and the writers all ask them, so adding an operator touches its own module and one
registry line.

Two kinds: a `Pruning` operator decides which channels of a sublayer (a block's attention or FFN) stay,
one per sublayer kind; a `Form` decides how one linear is stored: as a single quantized matrix, or as
factors (a decomposition), each factor quantized to the type its rows can hold.

What several operators share lives here once: a block weight as they compute on it, a stored matrix's spec, and
the pruning operators' channel score and choice of the channels to keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from autosquash.formats.codecs import QuantizedTensor, dequantize
from autosquash.formats.gguf_types import legal_type_or_f16, tensor_type
from autosquash.models.arch import Arch


@dataclass(frozen=True)
class ChoiceField:
    """One field an operator adds to a layer choice: its type, its neutral value (the operator does nothing),
    pydantic bounds, and whether a search space may list values for it."""

    name: str
    annotation: Any
    neutral: Any
    bounds: dict[str, float] = field(default_factory=dict)  # ge / le / lt, as pydantic's Field takes them
    searched: bool = True  # a search space lists options for it (a list of values per sublayer kind)
    space_default: bool = True  # a space that names no options for it gets [neutral]
    validate: Callable[[Any], Any] | None = None  # normalises a value or raises ValueError
    validate_option: Callable[[Any], Any] | None = None  # the same for a search space's option (default: validate)


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
        """Exact bytes in its type (GGUF block sizes)."""
        return tensor_type(self.type).nbytes(self.shape)

    @property
    def bytes_read_per_token(self) -> float:
        """Bytes one decoded token reads: one row of an embedding table, all of any other tensor."""
        return self.nbytes / self.shape[0] if self.lookup else float(self.nbytes)


class Operator:
    """A compression operator: its name, the choice fields it adds and which sublayer kinds may use them."""

    name: str = ""
    fields: tuple[ChoiceField, ...] = ()
    kinds: tuple[str, ...] = ("attn", "ffn")  # sublayer kinds whose choices may move its fields off neutral
    gguf: bool = True  # whether a GGUF file (llama.cpp) can hold what it makes
    what: str = ""  # what it makes, in words, for error messages

    def check_space(self, target: str, kind: str, values: dict[str, list]) -> None:
        """Raise ValueError (naming the field) when a search space's `values` for this operator's fields are
        not deployable on `target` for `kind` sublayers."""
        for f in self.fields:
            moved = [v for v in values.get(f.name, [f.neutral]) if v != f.neutral]
            if moved and kind not in self.kinds:
                raise ValueError(f"{kind}.{f.name}: {kind} groups have nothing for {self.name} to act on")
            if moved and target == "gguf" and not self.gguf:
                raise ValueError(f"{kind}.{f.name}: a gguf target cannot hold {self.what}; use target: torch")

    def is_neutral(self, choice: Any) -> bool:
        """Whether `choice` leaves this operator off."""
        return all(getattr(choice, f.name) == f.neutral for f in self.fields)


class Pruning(Operator):
    """Structured pruning of one sublayer kind: how many units stay, the linears' shapes then, which rows
    and input columns they keep, and how the sensitivity model measures the loss."""

    kind: str = ""
    module: str = ""  # the sublayer's module inside a block ("mlp", "self_attn")
    removed: type[torch.nn.Module] = torch.nn.Identity  # what stands for the sublayer when no unit stays

    def full(self, arch: Arch) -> int:
        """Units of an unpruned sublayer."""
        raise NotImplementedError

    def kept(self, arch: Arch, choice: Any) -> int:
        """Units a choice keeps (0 removes the sublayer)."""
        raise NotImplementedError

    def shapes(self, arch: Arch, kept: int) -> dict[str, tuple[int, int]]:
        """(out, in) of each of the sublayer's linears, by GGUF short name, when `kept` units stay."""
        raise NotImplementedError

    def select(self, block: torch.nn.Module, i: int, arch: Arch, kept: int, stats: dict) -> dict[str, tuple]:
        """(kept rows, kept input columns) of each linear (None keeps all) when `kept` units of block `i` stay."""
        raise NotImplementedError

    def resize(self, sublayer: torch.nn.Module, kept: int) -> None:
        """Tell a partly pruned sublayer module its new width, where it keeps one."""

    def importance(self, block: torch.nn.Module, i: int, arch: Arch, stats: dict) -> torch.Tensor:
        """Score of each unit (activation-aware); pruning keeps the highest."""
        raise NotImplementedError

    def probe_swaps(self, block: torch.nn.Module, i: int, arch: Arch, kept: int, stats: dict) -> dict:
        """Weights (module path -> tensor) that compute what the pruned sublayer computes, for a probe pass."""
        raise NotImplementedError

    def pruned_share(self, block: torch.nn.Module, i: int, arch: Arch, kept: int, stats: dict) -> float:
        """Share of the weighted output energy the dropped units carried."""
        energy = self.importance(block, i, arch, stats).float().pow(2)
        return float(1 - energy.topk(kept).values.sum() / energy.sum()) if kept > 0 else 1.0


@dataclass(frozen=True)
class Variant:
    """A compressed linear (or table) as deployed: its form's name and its parts by tensor suffix
    (GGUF blocks for quantized parts, plain tensors for indices and scales)."""

    form: str
    parts: dict[str, QuantizedTensor | torch.Tensor]

    def decoded(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Every part as a float32 (or index) tensor, quantized ones through the dequantizer trials use,
        on `device` (the CPU by default)."""
        return {
            k: dequantize(v, device) if isinstance(v, QuantizedTensor) else v.to(device or "cpu")
            for k, v in self.parts.items()
        }


class Form(Operator):
    """How one linear is stored: the tensors it deploys, how they are computed from the weight, and the
    module that evaluates them. Quantized parts are held by submodules named after their suffix (`lr_a`),
    or by the linear itself for a plain `weight`, so a LoRA adapter names the tensor it adapts."""

    suffixes: tuple[str, ...] = ()
    plain: bool = False  # the one form without a decomposition: a linear takes it when no other form applies
    compensates: bool = False  # it can spread its quantization error through the inputs' covariance (GPTQ)
    # Rows are compressed independently, so an error measured on a sample of rows stands for the whole.
    row_separable: bool = False

    def size(self, out_features: int, in_features: int, choice: Any) -> int:
        """The form's size parameter (rank, terms) for this linear; 0 when it is off or would not save storage."""
        raise NotImplementedError

    def tensors(self, name: str, out_f: int, in_f: int, quant: str, size: int) -> list[TensorSpec]:
        """The tensors a linear `name` of (out_f, in_f) deploys, each in the legal type for `quant`."""
        raise NotImplementedError

    def compress(self, weight: torch.Tensor, deploy: LinearDeploy, input_sq: torch.Tensor | None) -> dict:
        """The parts (by suffix) of `weight` stored as `deploy` says, quantized ones in their specs' types."""
        raise NotImplementedError

    def compress_compensated(
        self,
        weight: torch.Tensor,
        deploy: LinearDeploy,
        input_sq: torch.Tensor | None,
        hessian: torch.Tensor,
        damp: float,
    ) -> dict:
        """`compress`, each quantization error spread through `hessian`, the inputs' E[x xᵀ] (forms that
        `compensates`)."""
        raise NotImplementedError

    def module(self, parts: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The module a trial evaluates from decoded parts."""
        raise NotImplementedError

    def dense(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 matrix the decoded parts stand for."""
        raise NotImplementedError


@dataclass(frozen=True)
class LinearDeploy:
    """What one linear deploys for a choice: its form, the form's size and its tensors with their GGUF types
    (fallbacks included). The variant cache key, apply, the sensitivity model, the cost model and the
    writers all take their answer from here."""

    form: Form
    size: int
    tensors: tuple[TensorSpec, ...]

    def type_of(self, suffix: str) -> str:
        """The GGUF type of part `suffix` (e.g. 'lr_a')."""
        for t in self.tensors:
            if t.name.endswith(f".{suffix}"):
                return t.type
        raise KeyError(suffix)

    @property
    def key(self) -> tuple:
        """Identity of the deployed tensors: equal keys hold equal bytes (for a given base model and statistics)."""
        return (self.form.name, self.size, tuple((t.name, t.shape, t.type) for t in self.tensors))

    def compress(
        self,
        weight: torch.Tensor,
        input_sq: torch.Tensor | None,
        hessian: torch.Tensor | None = None,
        damp: float = 0.0,
    ) -> Variant:
        """`weight` compressed as deployed, its parts in host memory; with `hessian` (the inputs' E[x xᵀ], for
        a form that `compensates`), its quantization errors spread through it, dampened by `damp`."""
        if hessian is None:
            parts = self.form.compress(weight, self, input_sq)
        elif self.form.compensates:
            parts = self.form.compress_compensated(weight, self, input_sq, hessian, damp)
        else:
            raise ValueError(f"the {self.form.name} form does not compensate quantization errors")
        return Variant(self.form.name, {k: v if isinstance(v, QuantizedTensor) else v.cpu() for k, v in parts.items()})


def weight_of(block: torch.nn.Module, path: str) -> torch.Tensor:
    """A block linear's weight as the operators compute on it: float32, on the device the model sits on (the
    codecs and decompositions run there; what they keep, GGUF bytes and index tensors, is in host memory)."""
    return block.get_submodule(path).weight.data.detach().to(torch.float32)


def matrix_spec(name: str, rows: int, cols: int, quant: str, macs: int) -> TensorSpec:
    """A stored matrix in the legal type for `quant` on rows of `cols` values (F16 where none fits)."""
    return TensorSpec(name, (rows, cols), legal_type_or_f16(quant, cols), macs)


def input_channel_importance(down_weight: torch.Tensor, down_input_sq: torch.Tensor | None) -> torch.Tensor:
    """Score of each input channel of a linear (an FFN channel entering down_proj, say): the norm
    of its weight column times its RMS activation.

    Activation-aware as in Wanda (Sun et al., 2023), applied to whole channels; without statistics
    it is the column norm alone.
    """
    score = down_weight.float().norm(dim=0)
    if down_input_sq is not None:
        score = score * down_input_sq.to(score.device, torch.float32).sqrt()
    return score


def keep_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important channels, in their original order, in host memory (where the
    variant cache keeps selections; they index a weight on any device)."""
    return torch.topk(importance, keep).indices.sort().values.cpu()
