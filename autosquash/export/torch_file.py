"""The torch format: what GGUF cannot hold (low-rank and Kronecker factors, pruned sublayers, a LoRA adapter).

One safetensors file (no pickle). Tensors are named as deployed (`blk.3.attn_q.lr_a`, `blk.3.ffn_up.kron_a`,
`blk.3.attn_q.weight.lora_a`, ...); each compressed tensor is kept as its raw GGUF blocks (uint8 rows) with
its type, so the file is the size the cost model prices and decodes, through the dequantizer trials use, to
the very float weights its trial evaluated. The header's metadata holds the plan, the base model's config
and spec (whose tokenizer the model uses), and the LoRA alpha.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autosquash.compress.apply import KronVariant, RemovedAttention, RemovedMLP, VariantCache, quantized_tensors
from autosquash.compress.calibrate import Stats
from autosquash.compress.kronecker import KronFactors, KronLinear, kron_shape
from autosquash.compress.lowrank import LowRankLinear, linear_with
from autosquash.compress.plan import ATTN_LINEARS, FFN_LINEARS, Plan, kept_ffn_channels, kept_kv_heads
from autosquash.compress.quant import QuantizedTensor, dequantize, quantize
from autosquash.errors import AutosquashError
from autosquash.export.gguf_file import merged_weights
from autosquash.export.lora import adapter_weights, apply_adapter
from autosquash.models.arch import Arch

FORMAT = "autosquash-torch"
VERSION = "1"


def _index_dtype(n: int) -> torch.dtype:
    """Permutation indices in int16 (as the cost model prices them) when they fit."""
    return torch.int16 if n <= 2**15 else torch.int32


class _Tensors:
    """The file's tensors, with the GGUF type and shape of each compressed one."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.types: dict[str, list] = {}

    def blocks(self, name: str, q: QuantizedTensor) -> None:
        self.tensors[name] = torch.from_numpy(q.data.copy())
        self.types[name] = [q.type, *q.shape]

    def plain(self, name: str, t: torch.Tensor) -> None:
        self.tensors[name] = t.detach().contiguous().clone()


def save(
    path: str | Path,
    spec: str,
    base: torch.nn.Module,
    arch: Arch,
    plan: Plan,
    stats: Stats,
    cache: VariantCache | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, int]:
    """Write `plan` applied to `base` to `path` in the torch format; returns the count of tensors per type.

    `model` is the plan's model as its trial evaluated it (compress, then heal): a merged adapter's F16
    weights are taken from it, a kept adapter is stored beside the weights (None: no healing).
    """
    from safetensors.torch import save_file

    out = _Tensors()
    merged = merged_weights(model)
    for name, module, variant in quantized_tensors(base, arch, plan, stats, cache):
        if isinstance(variant, KronVariant):
            out.blocks(f"{name}.kron_a", variant.a)
            out.blocks(f"{name}.kron_b", variant.b)
            out.plain(f"{name}.row_perm", variant.row_perm.to(_index_dtype(variant.row_perm.numel())))
            out.plain(f"{name}.col_perm", variant.col_perm.to(_index_dtype(variant.col_perm.numel())))
            if variant.col_scale is not None:
                out.plain(f"{name}.col_scale", variant.col_scale.float())
            continue
        tensors = [("weight", "weight")] if len(variant) == 1 else [("lr_a", "a.weight"), ("lr_b", "b.weight")]
        for (suffix, param), q in zip(tensors, variant, strict=True):
            if merged is not None and name.startswith("blk."):
                q = merged(f"{module}.{param}", q)
            out.blocks(f"{name}.{suffix}", q)
    layers = base.model.layers
    for i in range(arch.n_layers):
        if kept_kv_heads(arch, plan.choice(f"blk.{i}.attn")):
            out.plain(f"blk.{i}.attn_norm.weight", layers[i].input_layernorm.weight)
        if kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn")):
            out.plain(f"blk.{i}.ffn_norm.weight", layers[i].post_attention_layernorm.weight)
    out.plain("output_norm.weight", base.model.norm.weight)
    adapter, alpha = adapter_weights(model) if model is not None else ({}, 0.0)
    for name, (a, b) in adapter.items():
        out.blocks(f"{name}.lora_a", quantize(a, "F16"))  # healing rounded A and B to F16: exact
        out.blocks(f"{name}.lora_b", quantize(b, "F16"))
    metadata = {
        "format": FORMAT,
        "format_version": VERSION,
        "base_model": spec,
        "config": base.config.to_json_string(use_diff=False),
        "plan": plan.model_dump_json(),
        "types": json.dumps(out.types),
        "lora_alpha": json.dumps(alpha if adapter else None),
    }
    save_file(out.tensors, str(path), metadata=metadata)
    counts: dict[str, int] = {}
    for name in out.tensors:
        kind = out.types[name][0] if name in out.types else str(out.tensors[name].dtype).removeprefix("torch.")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a torch-format file; a one-line error for anything else."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise AutosquashError(f"model file {p} does not exist")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AutosquashError(
            f"{p} is not an autosquash torch-format file (safetensors): {str(e).splitlines()[0]}"
        ) from None
    if meta.get("format") != FORMAT:
        raise AutosquashError(f"{p} is a safetensors file but not autosquash's torch format (export --format torch)")
    if meta.get("format_version") != VERSION:
        raise AutosquashError(
            f"{p} is torch format version {meta.get('format_version')}; this autosquash reads {VERSION}"
        )
    return meta


def read_config(meta: dict[str, str]):
    """The base model's transformers config recorded in a torch-format file."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(meta["config"]))


class _Stored:
    """A torch-format file's tensors, decoded on request: GGUF blocks through the dequantizer, the rest as is."""

    def __init__(self, path: str | Path, types: dict[str, list]):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            self.raw = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        self.path, self.types = path, types

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.raw:
            raise AutosquashError(f"{self.path}: tensor {name} is missing")
        if name not in self.types:
            return self.raw[name]
        qtype, rows, cols = self.types[name]
        return dequantize(QuantizedTensor(qtype, (rows, cols), self.raw[name].numpy()))


def load(path: str | Path) -> tuple[torch.nn.Module, str]:
    """The float32 model (eval mode) of a torch-format file, as its trial evaluated it, and the spec of the
    base model whose tokenizer it uses."""
    from transformers import AutoModelForCausalLM

    meta = read_metadata(path)
    config = read_config(meta)
    plan = Plan.model_validate_json(meta["plan"])
    stored = _Stored(path, json.loads(meta["types"]))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = Arch.from_config(config)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            _fill_block(block, i, arch, plan, stored)
        model.model.embed_tokens.weight.data = stored["token_embd.weight"]
        if not arch.tied_embeddings:
            model.lm_head.weight.data = stored["output.weight"]
        model.model.norm.weight.data = stored["output_norm.weight"]
    model.eval()
    alpha = json.loads(meta.get("lora_alpha", "null"))
    if alpha is not None:
        names = sorted({n.removesuffix(".lora_a") for n in stored.raw if n.endswith(".lora_a")})
        model = apply_adapter(model, {n: (stored[f"{n}.lora_a"], stored[f"{n}.lora_b"]) for n in names}, alpha)
    return model, meta["base_model"]


def _fill_block(block, i: int, arch: Arch, plan: Plan, stored: _Stored) -> None:
    """Block `i` rebuilt as compress() built it: removed sublayers, then each linear in its stored form."""
    if kept_kv_heads(arch, plan.choice(f"blk.{i}.attn")) == 0:
        block.self_attn = RemovedAttention()
    else:
        block.input_layernorm.weight.data = stored[f"blk.{i}.attn_norm.weight"]
    ff = kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn"))
    if ff == 0:
        block.mlp = RemovedMLP()
    else:
        block.mlp.intermediate_size = ff
        block.post_attention_layernorm.weight.data = stored[f"blk.{i}.ffn_norm.weight"]
    for short, path in ATTN_LINEARS + FFN_LINEARS:
        name = f"blk.{i}.{short}"
        if f"{name}.weight" in stored:
            layer = linear_with(stored[f"{name}.weight"])
        elif f"{name}.lr_a" in stored:
            layer = LowRankLinear(stored[f"{name}.lr_a"], stored[f"{name}.lr_b"])
        elif f"{name}.kron_a" in stored:
            layer = KronLinear(_kron_factors(name, stored))
        else:
            continue  # a removed sublayer's linear
        parent, attr = path.rsplit(".", 1)
        block.get_submodule(parent).register_module(attr, layer)


def _kron_factors(name: str, stored: _Stored) -> KronFactors:
    """A linear's Kronecker factors, reshaped from one stored row per term back to (terms, rows, cols)."""
    row_perm, col_perm = stored[f"{name}.row_perm"].long(), stored[f"{name}.col_perm"].long()
    m1, m2, n1, n2 = kron_shape(row_perm.numel(), col_perm.numel())
    scale = stored[f"{name}.col_scale"] if f"{name}.col_scale" in stored else None
    a, b = stored[f"{name}.kron_a"], stored[f"{name}.kron_b"]
    return KronFactors(a.reshape(-1, m1, n1), b.reshape(-1, m2, n2), row_perm, col_perm, scale)
