"""Write a plan's model as a GGUF file for llama.cpp, every tensor in the type its trial evaluated.

A plan without pruning is written with the `llama` architecture; per-layer FFN widths and head
counts need the `deci` architecture, whose loader in llama.cpp reads them per layer, 0 for a removed
sublayer (DESIGN.md §2). The tokenizer is copied from the source GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType

from autosquash.compress.apply import VariantCache, quantized_tensors
from autosquash.compress.calibrate import Stats
from autosquash.compress.plan import Plan, kept_ffn_channels, kv_heads_per_layer
from autosquash.errors import AutosquashError
from autosquash.models.arch import Arch
from autosquash.models.load import DEFAULT_MODEL, ModelSource, resolve


def rope_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotate-half layout to GGUF's interleaved rotary layout.

    The inverse of the reordering transformers applies when it loads a llama GGUF file.
    """
    head_dim = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tokenizer_source(src: ModelSource) -> Path:
    if src.kind == "gguf":
        return Path(src.location, src.gguf_file)
    if src.kind == "config":
        return _tokenizer_source(resolve(DEFAULT_MODEL))
    raise AutosquashError(
        f"GGUF export copies the tokenizer from a GGUF file; {src.location} is a {src.kind} model (not supported yet)"
    )


def _copy_tokenizer(writer: GGUFWriter, source: Path) -> None:
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(
    path: str | Path,
    spec: str,
    base: torch.nn.Module,
    arch: Arch,
    plan: Plan,
    stats: Stats,
    cache: VariantCache | None = None,
) -> dict[str, int]:
    """Write `plan` applied to `base` to `path`; returns the count of tensors per GGUF type."""
    if any(c.rank_ratio > 0 or c.kron_rank > 0 for c in plan.groups.values()):
        raise AutosquashError("this plan uses low-rank or Kronecker factors, which no GGUF runtime holds")
    widths = [kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn")) for i in range(arch.n_layers)]
    kv_heads = kv_heads_per_layer(arch, plan)
    heads = [n * (arch.n_heads // arch.n_kv_heads) for n in kv_heads]
    uniform = len(set(widths)) == 1 and len(set(kv_heads)) == 1 and widths[0] > 0 and kv_heads[0] > 0
    arch_name = "llama" if uniform else "deci"
    writer = GGUFWriter(str(path), arch_name)
    writer.add_name(f"{getattr(base.config, 'name_or_path', '') or spec} (autosquash)")
    writer.add_context_length(int(base.config.max_position_embeddings))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(widths[0] if arch_name == "llama" else widths)
    writer.add_head_count(heads[0] if arch_name == "llama" else heads)
    writer.add_head_count_kv(kv_heads[0] if arch_name == "llama" else kv_heads)
    writer.add_rope_freq_base(_rope_theta(base.config))
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_layer_norm_rms_eps(float(base.config.rms_norm_eps))
    writer.add_vocab_size(arch.vocab_size)
    writer.add_quantization_version(2)
    _copy_tokenizer(writer, _tokenizer_source(resolve(spec)))

    counts: dict[str, int] = {}

    def add(name: str, data: np.ndarray, qtype: str) -> None:
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
        counts[qtype] = counts.get(qtype, 0) + 1

    def add_norm(name: str, weight: torch.Tensor) -> None:
        add(name, weight.detach().float().numpy(), "F32")

    layers = base.model.layers
    for gguf_name, _, variant in quantized_tensors(base, arch, plan, stats, cache):
        ((q, _),) = variant
        data = q.data
        if gguf_name.endswith("attn_q"):
            data = rope_permute(data, arch.n_heads)
        elif gguf_name.endswith("attn_k"):
            data = rope_permute(data, arch.n_kv_heads)
        # Each present sublayer's norm goes before its first weight; a removed one has none.
        if gguf_name.endswith("attn_q"):
            i = int(gguf_name.split(".")[1])
            add_norm(f"blk.{i}.attn_norm.weight", layers[i].input_layernorm.weight)
        elif gguf_name.endswith("ffn_gate"):
            i = int(gguf_name.split(".")[1])
            add_norm(f"blk.{i}.ffn_norm.weight", layers[i].post_attention_layernorm.weight)
        add(f"{gguf_name}.weight", data, q.type)
    add_norm("output_norm.weight", base.model.norm.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts
