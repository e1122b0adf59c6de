"""Apply a plan to a base model: prune, then decompose, then quantize, layer by layer.

`quantized_tensors` yields the deployed parts of every compressed tensor; `compress` builds the float
model a trial evaluates by decoding exactly those parts, so a trial scores what its export holds.
Each compressed tensor is computed once per (layer, deployed tensors) and reused from a variant cache,
which keeps the GGUF bytes (a quarter to a twelfth of the float32 weights) and decodes them on every use.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from autosquash.compress.calibrate import HEAD, HEAD_COVARIANCE, Compensation, Stats, compensation_of
from autosquash.compress.gptq import quantize_compensated_no_worse
from autosquash.compress.operators import PRUNING, deploy_linear, form
from autosquash.compress.operators.base import Variant, weight_of
from autosquash.compress.plan import SUBLAYERS, Plan
from autosquash.compress.quantize import quantize, quantize_no_worse
from autosquash.compress.store import VariantStore
from autosquash.formats.codecs import QuantizedTensor, dequantize
from autosquash.formats.gguf_types import legal_type
from autosquash.models.arch import Arch
from autosquash.models.device import model_device, to_compute
from autosquash.models.layers import with_bias

__all__ = ["Variant", "VariantCache", "compress", "dense", "linear_variant", "make_variants", "quantized_tensors"]


def dense(variant: Variant, device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 matrix a compressed weight stands for (W, B·A for SVD factors, the Kronecker sum, ...),
    on `device` (the CPU by default)."""
    return form(variant.form).dense(variant.decoded(device))


def _nbytes(value, decoded: bool = False) -> int:
    """Bytes a cached value holds (as float32 when `decoded`): parts of variants, index tensors, nested."""
    if value is None:
        return 0
    if isinstance(value, QuantizedTensor):
        return value.shape[0] * value.shape[1] * 4 if decoded else value.data.nbytes
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Variant):
        return _nbytes(tuple(value.parts.values()), decoded)
    if isinstance(value, dict):
        return _nbytes(tuple(value.values()), decoded)
    return sum(_nbytes(v, decoded) for v in value)


@dataclass
class VariantCache:
    """Least-recently-used store of compressed tensors (and pruning selections), bounded in bytes; with a
    `store`, what it lacks is read from disk before it is made, and what it makes is written there."""

    max_bytes: int = 2 << 30
    store: VariantStore | None = None
    hits: int = 0
    stored_hits: int = 0  # misses the store answered
    misses: int = 0
    make_s: float = 0.0  # seconds spent making values on misses (quantizing, decomposing, selecting)

    def __post_init__(self) -> None:
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def decoded_nbytes(self) -> int:
        """Bytes the held weights take once decoded to float32 (what each use of them allocates)."""
        return sum(_nbytes(v, decoded=True) for v in self._items.values())

    def get(self, key: tuple, make: Callable[[], object]):
        """The cached value of `key`, made (and cached) on a miss."""
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        value = self.store.load(key) if self.store is not None else None
        if value is not None:
            self.stored_hits += 1
        else:
            self.misses += 1
            start = time.perf_counter()
            value = make()
            self.make_s += time.perf_counter() - start
            if self.store is not None:
                self.store.save(key, value)
        self._items[key] = value
        self._bytes += _nbytes(value)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= _nbytes(old)
        return value


def _selections(block, i: int, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache) -> dict[str, tuple]:
    """(kept rows, kept input columns) of each linear of block `i` after structured pruning; None keeps all.

    A linear missing from the result belongs to a removed sublayer.
    """
    out: dict[str, tuple] = {}
    for kind, linears in SUBLAYERS:
        op = PRUNING[kind]
        kept = op.kept(arch, plan.choice(f"blk.{i}.{kind}"))
        if kept == op.full(arch):
            out.update({name: (None, None) for name, _ in linears})
        elif kept > 0:
            out.update(cache.get((op.name, i, kept), partial(op.select, block, i, arch, kept, stats)))
    return out


def quantized_tensors(
    base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache | None = None
) -> Iterator[tuple[str, str, Variant]]:
    """(GGUF name, module path, variant) for every compressed weight: block linears, then embeddings."""
    cache = cache or VariantCache(max_bytes=0)
    comp = compensation_of(stats)
    for i, block in enumerate(base.model.layers):
        kept = _selections(block, i, arch, plan, stats, cache)
        for kind, linears in SUBLAYERS:
            choice = plan.choice(f"blk.{i}.{kind}")
            for gguf_name, path in linears:
                if gguf_name not in kept:
                    continue
                variant = linear_variant(cache, block, i, gguf_name, path, choice, stats, kept[gguf_name], comp)
                yield f"blk.{i}.{gguf_name}", f"model.layers.{i}.{path}", variant
    yield (
        "token_embd",
        "model.embed_tokens",
        table_variant(cache, "token_embd", base, plan.embed_quant, arch, stats),
    )
    if not arch.tied_embeddings:
        head = table_variant(cache, "output", base, plan.output_quant or plan.embed_quant, arch, stats)
        yield "output", "lm_head", head


def linear_variant(
    cache: VariantCache,
    block: torch.nn.Module,
    i: int,
    gguf_name: str,
    path: str,
    choice,
    stats: Stats,
    kept: tuple = (None, None),
    comp: Compensation | None = None,
) -> Variant:
    """Linear `path` of block `i` as `choice` deploys it, on the (rows, input columns) pruning keeps (None:
    all), error-compensated by `comp` where its form compensates; through `cache`, keyed by what it deploys.
    What a trial builds, and what the sensitivity profile's probes put in (from the same cache and store)."""
    rows, cols = kept
    w = weight_of(block, path)
    bias = bias_of(block, path, rows)
    input_sq = stats.get(f"model.layers.{i}.{path}")
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
        input_sq = input_sq[cols] if input_sq is not None else None
    deploy = deploy_linear(f"blk.{i}.{gguf_name}", w.shape[0], w.shape[1], choice)
    if rows is None and cols is None and deploy.form.plain:
        blocks = source_blocks(block.get_submodule(path), deploy.type_of("weight"))
        if blocks is not None:
            parts = {"weight": blocks} if bias is None else {"weight": blocks, "bias": bias}
            return cache.get(deploy.key + ("source",), lambda: Variant(deploy.form.name, parts))
    # Keyed by what the linear deploys: a factor whose rows take another type than W's is its own entry, and
    # so is a compensated variant (keyed by its compensation too).
    key, linear_comp = deploy.key, None
    if comp is not None and deploy.form.compensates:
        key, linear_comp = deploy.key + comp.key, (comp, f"model.layers.{i}.{path}", cols)
    return cache.get(key, partial(_with_bias, deploy, w, input_sq, bias, linear_comp))


def make_variants(base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache) -> None:
    """Make every compressed tensor of `plan` through `cache` (into its store), assembling no model."""
    for _ in quantized_tensors(base, arch, plan, stats, cache):
        pass


def bias_of(block: torch.nn.Module, path: str, rows: torch.Tensor | None) -> torch.Tensor | None:
    """A block linear's bias (float32, host memory) on the rows pruning keeps; None when it has none."""
    bias = block.get_submodule(path).bias
    if bias is None:
        return None
    bias = bias.detach().to("cpu", torch.float32)
    return bias[rows] if rows is not None else bias.clone()  # never the base model's own tensor


def _with_bias(
    deploy, w: torch.Tensor, input_sq, bias: torch.Tensor | None, comp: tuple[Compensation, str, object] | None = None
) -> Variant:
    """The linear as deployed, its bias (kept whole, F32) as the part `bias`; with `comp` (the compensation,
    the linear's module path, the input columns pruning keeps), its quantization error compensated."""
    hessian, damp = None, 0.0
    if comp is not None:
        compensation, path, cols = comp
        hessian, damp = compensation.hessian(path, cols), compensation.damp
    variant = deploy.compress(w, input_sq, hessian, damp)
    return variant if bias is None else Variant(variant.form, {**variant.parts, "bias": bias})


# GPTQ's dampening for a table the head reads, as a share of E[h hᵀ]'s mean diagonal: ten times GPTQ's 0.01,
# since the calibration's few thousand tokens estimate E[h hᵀ] loosely. On SmolLM2 (its 2048 calibration
# tokens; KL on the 2048 test tokens after the selection set, blocks as the default search ships them) 0.1
# gave a Q5_1 table KL 0.00366 and a Q4_0 one 0.0287, against 0.00419 and 0.0324 with 0.01, and 0.0056 and
# 0.0469 uncompensated; Q8_0 stayed lossless.
TABLE_DAMP = 0.1
# Compensation pays where the weighted table still errs: on Qwen2.5-Coder-1.5B's output head (8,192 of its
# rows, E[h hᵀ] from 2,048 Wikipedia tokens) it cut the output error e H eᵀ by 3.3-4.6x at every type from
# Q6_K (on token_embd's rows: the head ships on Q6_K's grid) to Q2_K, for 2.0-4.0x the weighted encoding's
# time. A Q8_0 table, though, errs about 1e-5 of w H wᵀ already (by diag H; 7e-6 by H), some 50 times less
# than at Q5_1, where SmolLM2's Q5_1 table has test KL 0.0056: about 1e-4, so compensation could save less
# than that. Q6_K errs about 1e-4 where the weights are not on its grid. A slice of rows whose weighted
# encoding errs below this share (by diag H) keeps it, which also skips a table already on the type's grid
# (a GGUF-shipped table re-quantized to its own type).
TABLE_MIN_COMPENSATED_ERROR = 3e-5


def quantized_table(base: torch.nn.Module, arch: Arch, name: str, quant: str, stats: Stats) -> QuantizedTensor:
    """The token table ("token_embd") or the untied output head ("output") in the legal type for `quant`: the base
    file's own blocks where they are of that type (`source_blocks`), else quantized as follows.

    A table the output head reads (the head itself, or a tied token table) is quantized weighted by the head's
    input energy per channel: the logits' error is that of W h, whose channels differ by orders of magnitude
    in E[h²] (each block kept as the unweighted encoding where that errs less by this measure, so a table
    already on the type's grid stays exact), and its error spread through E[h hᵀ] (GPTQ, compress.gptq) where
    that lowers a row's output error and the weighted encoding errs enough for it to pay
    (TABLE_MIN_COMPENSATED_ERROR). An untied token table is only looked up, every channel alike.
    """
    module = _table_module(base, name)
    qtype, importance = legal_type(quant, arch.hidden_size), stats.get(HEAD)
    blocks = source_blocks(module, qtype)
    if blocks is not None:
        return blocks
    if importance is None or not (name == "output" or arch.tied_embeddings):
        return quantize(module.weight.data, qtype)
    covariance = stats.get(HEAD_COVARIANCE)
    if covariance is None:
        return quantize_no_worse(module.weight.data, qtype, importance)
    return quantize_compensated_no_worse(
        module.weight.data, qtype, covariance, importance, TABLE_DAMP, TABLE_MIN_COMPENSATED_ERROR
    )


def _table_module(base: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module holding table `name`: the token embedding ("token_embd") or the output head ("output")."""
    return base.model.embed_tokens if name == "token_embd" else base.lm_head


def source_blocks(module: torch.nn.Module, type_name: str) -> QuantizedTensor | None:
    """The base model file's own blocks of `module`'s weight where they are of type `type_name`: a GGUF base
    model's tensor asked for its own type is kept as the file holds it (exactly the base model's weight, and no
    work), as llama-quantize leaves a tensor already in its target type. None otherwise."""
    blocks = getattr(module, "gguf_source", None)
    return blocks if blocks is not None and blocks.type == type_name else None


def table_variant(
    cache: VariantCache, name: str, base: torch.nn.Module, quant: str, arch: Arch, stats: Stats
) -> Variant:
    """`quantized_table` as a variant, cached (the sensitivity profile makes them under the same keys; the base
    file's own blocks under a key of their own)."""
    key = (name, legal_type(quant, arch.hidden_size))
    if source_blocks(_table_module(base, name), key[1]) is not None:
        key += ("source",)
    return cache.get(key, lambda: Variant("quant", {"weight": quantized_table(base, arch, name, quant, stats)}))


def compress(
    base: torch.nn.Module, arch: Arch, plan: Plan, stats: Stats, cache: VariantCache | None = None
) -> torch.nn.Module:
    """A new model: `base` with every linear weight and the embeddings compressed as `plan` says."""
    # Share the block linears' weights instead of copying them: every one of them is replaced below.
    memo = {id(m.weight): m.weight for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    memo.update({id(m.gguf_source): m.gguf_source for m in base.modules() if hasattr(m, "gguf_source")})
    model = copy.deepcopy(base, memo)
    device = model_device(base)
    for gguf_name, path, variant in quantized_tensors(base, arch, plan, stats, cache):
        if gguf_name in ("token_embd", "output"):
            # Assigning .data keeps a tied output head pointing at the same (compressed) table.
            model.get_submodule(path).weight.data = to_compute(dequantize(variant.parts["weight"], device), model)
            continue
        parent, attr = path.rsplit(".", 1)
        parts = {k: to_compute(v, model) for k, v in variant.decoded(device).items()}
        bias = parts.pop("bias", None)
        model.get_submodule(parent).register_module(attr, with_bias(form(variant.form).module(parts), bias))
    for i, block in enumerate(model.model.layers):
        shape_sublayers(block, i, arch, plan)
    return model.eval()


def shape_sublayers(block: torch.nn.Module, i: int, arch: Arch, plan: Plan) -> None:
    """Install the removed-sublayer stand-ins and the pruned widths of block `i` (its linears are set apart)."""
    for kind, _ in SUBLAYERS:
        op = PRUNING[kind]
        kept = op.kept(arch, plan.choice(f"blk.{i}.{kind}"))
        if kept == 0:
            setattr(block, op.module, op.removed())
        elif kept < op.full(arch):
            op.resize(block.get_submodule(op.module), kept)
