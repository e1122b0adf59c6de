"""Write a plan's model as a GGUF file for llama.cpp, every tensor in the type its trial evaluated.

A plan without pruning is written with the `llama` architecture; per-layer FFN widths and head
counts need the `deci` architecture, whose loader in llama.cpp reads them per layer, 0 for a removed
sublayer (DESIGN.md §2). The tokenizer is copied from the source GGUF file, or written from a Hugging
Face model's tokenizer.json (formats/hf_vocab.py). A healed trial's merged
F16 weights are written as they were merged; an adapter kept apart goes to a GGUF LoRA file (lora.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGUFWriter

from autosquash.compress.apply import VariantCache, quantized_tensors
from autosquash.compress.calibrate import Stats
from autosquash.compress.plan import Plan, kept_ffn_channels, kv_heads_per_layer
from autosquash.errors import AutosquashError
from autosquash.export.build import deploys_factors
from autosquash.export.lora import has_adapter
from autosquash.formats.codecs import QuantizedTensor, quantize
from autosquash.formats.gguf import add_tensor, copy_tokenizer, gguf_writer, rope_permute
from autosquash.formats.hf_vocab import add_hf_tokenizer
from autosquash.models.arch import LLAMA_GRAPH_TYPES, Arch
from autosquash.models.load import DEFAULT_MODEL, ModelSource, load_tokenizer, resolve


def check_writable(arch: Arch) -> None:
    """Refuse model families whose blocks llama.cpp's `llama`/`deci` graphs would not compute as the trial did
    (Qwen3's and Gemma 3's q/k norms, Gemma's post-norms and scaled embeddings): the file would load and be wrong."""
    if arch.model_type not in LLAMA_GRAPH_TYPES:
        raise AutosquashError(
            f"GGUF export writes llama.cpp's llama/deci architectures, which do not run {arch.model_type} blocks "
            "as they are; search and export it with a torch-target space (--format torch)"
        )


def gguf_arch(arch: Arch, plan: Plan) -> str:
    """`llama` when every block keeps the same FFN width and heads, else `deci` (per-layer shapes)."""
    widths = [kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn")) for i in range(arch.n_layers)]
    kv_heads = kv_heads_per_layer(arch, plan)
    uniform = len(set(widths)) == 1 and len(set(kv_heads)) == 1 and widths[0] > 0 and kv_heads[0] > 0
    return "llama" if uniform else "deci"


def _tokenizer_gguf(src: ModelSource) -> Path | None:
    """The GGUF file whose tokenizer a model's export copies; None for a Hugging Face model (its tokenizer.json
    is written instead)."""
    if src.kind == "gguf":
        return Path(src.location, src.gguf_file)
    if src.kind == "config":
        return _tokenizer_gguf(resolve(DEFAULT_MODEL))
    return None


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
    model: torch.nn.Module | None = None,
) -> dict[str, int]:
    """Write `plan` applied to `base` to `path`; returns the count of tensors per GGUF type.

    `model` is the plan's model as its trial evaluated it: when healing merged its adapter (a model
    without peft layers), its F16/F32 block weights are written instead of the compressed ones.
    """
    check_writable(arch)
    if deploys_factors(arch, plan):
        raise AutosquashError(
            "this plan uses low-rank or Kronecker factors, which no GGUF runtime holds; export it with --format torch"
        )
    widths = [kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn")) for i in range(arch.n_layers)]
    kv_heads = kv_heads_per_layer(arch, plan)
    heads = [n * (arch.n_heads // arch.n_kv_heads) for n in kv_heads]
    ffn_alone = [i for i, (w, kv) in enumerate(zip(widths, kv_heads, strict=True)) if w == 0 and kv > 0]
    if ffn_alone:
        # Checked with llama-cpp-python 0.3.36: deci's graph skips the rest of a block with no FFN,
        # attention output included, so the file would not compute what the trial measured.
        raise AutosquashError(
            f"block(s) {', '.join(map(str, ffn_alone))} remove the FFN but keep the attention, which llama.cpp's "
            "deci architecture cannot run (it drops that attention too); export with --format torch"
        )
    arch_name = gguf_arch(arch, plan)
    merged = merged_weights(model)
    counts: dict[str, int] = {}
    with gguf_writer(path, arch_name) as writer:
        _write_header(writer, spec, base, arch, arch_name, widths, heads, kv_heads)

        def add(name: str, q) -> None:
            kind = add_tensor(writer, name, q)
            counts[kind] = counts.get(kind, 0) + 1

        def add_norm(name: str, weight: torch.Tensor) -> None:
            add(name, weight.detach().to("cpu", torch.float32).numpy())

        layers = base.model.layers
        for gguf_name, module, variant in quantized_tensors(base, arch, plan, stats, cache):
            q = variant.parts["weight"]
            if merged is not None and gguf_name.startswith("blk."):
                q = merged(f"{module}.weight", q)
            if gguf_name.endswith(("attn_q", "attn_k")):
                q = QuantizedTensor(q.type, q.shape, rope_permute(q.data, arch.head_dim))
            # Each present sublayer's norm goes before its first weight; a removed one has none.
            if gguf_name.endswith("attn_q"):
                i = int(gguf_name.split(".")[1])
                add_norm(f"blk.{i}.attn_norm.weight", layers[i].input_layernorm.weight)
            elif gguf_name.endswith("ffn_gate"):
                i = int(gguf_name.split(".")[1])
                add_norm(f"blk.{i}.ffn_norm.weight", layers[i].post_attention_layernorm.weight)
            add(f"{gguf_name}.weight", q)
            bias = variant.parts.get("bias")  # Qwen2's q/k/v: F32, q/k's in the rows' interleaved order
            if bias is not None:
                bias = bias.numpy()
                add(
                    f"{gguf_name}.bias",
                    rope_permute(bias, arch.head_dim) if gguf_name.endswith(("attn_q", "attn_k")) else bias,
                )
        add_norm("output_norm.weight", base.model.norm.weight)
    return counts


def _write_header(
    writer: GGUFWriter, spec: str, base, arch: Arch, arch_name: str, widths: list, heads: list, kv_heads: list
) -> None:
    """The model's hyperparameters (per layer for `deci`) and the tokenizer copied from the source GGUF."""
    per_layer = arch_name != "llama"
    writer.add_name(f"{getattr(base.config, 'name_or_path', '') or spec} (autosquash)")
    writer.add_context_length(int(base.config.max_position_embeddings))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(widths if per_layer else widths[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv_heads if per_layer else kv_heads[0])
    writer.add_rope_freq_base(_rope_theta(base.config))
    writer.add_rope_dimension_count(arch.head_dim)
    # Stated, not left to llama.cpp's n_embd / n_head of block 0, which is wrong when block 0's heads are pruned.
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(float(base.config.rms_norm_eps))
    writer.add_vocab_size(arch.vocab_size)
    writer.add_quantization_version(2)
    source = _tokenizer_gguf(resolve(spec))
    if source is not None:
        copy_tokenizer(writer, source)
    else:
        add_hf_tokenizer(writer, load_tokenizer(spec))


def merged_weights(model: torch.nn.Module | None):
    """Where a healed model's merged weights replace the compressed ones: a function (parameter path,
    compressed tensor) -> the tensor to write, or None when there is no model or its adapter stays apart.

    Healing merges only into F16/F32 weights (search.trial.merges_adapter), rounded to F16, so re-encoding them
    in their own type is exact; an unhealed model gives back the compressed bytes themselves.
    """
    if model is None or has_adapter(model):
        return None

    def weight(param: str, q: QuantizedTensor) -> QuantizedTensor:
        if q.type not in ("F16", "F32"):
            return q
        return quantize(model.get_parameter(param).detach(), q.type)

    return weight
