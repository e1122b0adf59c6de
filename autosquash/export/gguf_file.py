"""Write a plan's model as a GGUF file for llama.cpp, every tensor in the type its trial evaluated.

Each family is written as llama.cpp's own architecture for it (models.gguf_family: `llama`, `qwen2`, `qwen3`,
`gemma2`, `gemma3`, `phi3`), with the keys and tensors that graph reads. Per-layer FFN widths and head counts need
the `deci` architecture, whose loader in llama.cpp reads them per layer, 0 for a removed sublayer (DESIGN.md §2):
open to the families llama.cpp's llama graph computes, refused for the others. The tokenizer is copied from the
source GGUF file, or written from a Hugging Face model's tokenizer.json (formats/hf_vocab.py). A healed trial's
merged F16 weights are written as they were merged; an adapter kept apart goes to a GGUF LoRA file (lora.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from autosquash.compress.apply import quantized_tensors
from autosquash.compress.plan import Plan, kept_ffn_channels, kv_heads_per_layer
from autosquash.compress.quantize import quantize
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel, deploys_factors
from autosquash.export.lora import has_adapter
from autosquash.formats.codecs import QuantizedTensor
from autosquash.formats.gguf import add_tensor, copy_tokenizer, gguf_writer
from autosquash.formats.hf_vocab import add_hf_tokenizer
from autosquash.models.arch import Arch
from autosquash.models.gguf_family import extra_tensors, family, to_gguf, write_hparams
from autosquash.models.load import DEFAULT_MODEL, ModelSource, ResolvedModel, load_tokenizer, resolve


def check_writable(arch: Arch, pruned: Sequence[str] = ()) -> None:
    """Refuse, before a gguf search runs, what no GGUF file of the family could hold: a family llama.cpp has no
    graph for here, or per-block pruning (`pruned`, the space's pruning fields that move) of a family whose graph
    reads one FFN width and KV-head count for all blocks."""
    fam = family(arch.model_type)
    if pruned and not fam.llama_graph:
        raise AutosquashError(
            f"{arch.model_type} exports as llama.cpp's {fam.gguf_arch}, whose graph reads one FFN width and KV-head "
            f"count for all blocks, so a gguf search of it offers no per-block pruning ({', '.join(pruned)}): "
            "keep those at [1.0], or search a torch space"
        )


def _shapes(arch: Arch, plan: Plan) -> tuple[list[int], list[int]]:
    widths = [kept_ffn_channels(arch, plan.choice(f"blk.{i}.ffn")) for i in range(arch.n_layers)]
    return widths, kv_heads_per_layer(arch, plan)


def gguf_arch(arch: Arch, plan: Plan) -> str:
    """The family's own architecture when every block keeps the same FFN width and heads, else `deci` (per-layer
    shapes), which only the families llama.cpp's llama graph runs can take."""
    fam = family(arch.model_type)
    widths, kv_heads = _shapes(arch, plan)
    if len(set(widths)) == 1 and len(set(kv_heads)) == 1 and widths[0] > 0 and kv_heads[0] > 0:
        return fam.gguf_arch
    if fam.llama_graph:
        return "deci"
    raise AutosquashError(
        f"llama.cpp's {fam.gguf_arch} graph sizes every block's tensors from block 0's, so a {arch.model_type} plan "
        "whose blocks differ in FFN width or KV heads cannot be written as GGUF; prune every block alike, or export "
        "with --format torch"
    )


def _tokenizer_gguf(src: ModelSource) -> Path | None:
    """The GGUF file whose tokenizer a model's export copies; None for a Hugging Face model (its tokenizer.json
    is written instead)."""
    if src.kind == "gguf":
        return Path(src.location, src.gguf_file)
    if src.kind == "config":
        return _tokenizer_gguf(resolve(DEFAULT_MODEL))
    return None


def write_gguf(path: str | Path, built: BuiltModel) -> dict[str, int]:
    """Write `built` (a plan applied to its base model) to `path`; returns the count of tensors per GGUF type.

    `built.model` is the plan's model as its trial evaluated it: when healing merged its adapter (a model
    without peft layers), its F16/F32 block weights are written instead of the compressed ones.
    """
    arch, plan = built.arch, built.plan
    widths, kv_heads = _runnable_shapes(arch, plan)
    heads = [n * (arch.n_heads // arch.n_kv_heads) for n in kv_heads]
    arch_name = gguf_arch(arch, plan)
    fam = family(arch.model_type)
    with gguf_writer(path, arch_name) as writer:
        writer.add_name(f"{getattr(built.base.config, 'name_or_path', '') or built.base_spec} (autosquash)")
        write_hparams(writer, fam, arch_name, built.base.config, arch, widths, heads, kv_heads)
        writer.add_quantization_version(2)
        _write_tokenizer(writer, built.base_model)
        counts = _write_tensors(writer, arch_name, built)
    return counts


def _runnable_shapes(arch: Arch, plan: Plan) -> tuple[list[int], list[int]]:
    """Each block's FFN width and KV heads, refusing a plan whose GGUF file would not compute what its trial
    measured: factors no GGUF runtime holds, or a block that keeps its attention without its FFN."""
    if deploys_factors(arch, plan):
        raise AutosquashError(
            "this plan uses low-rank or Kronecker factors, which no GGUF runtime holds; export it with --format torch"
        )
    widths, kv_heads = _shapes(arch, plan)
    ffn_alone = [i for i, (w, kv) in enumerate(zip(widths, kv_heads, strict=True)) if w == 0 and kv > 0]
    if ffn_alone:
        # Checked with llama-cpp-python 0.3.36: deci's graph skips the rest of a block with no FFN,
        # attention output included, so the file would not compute what the trial measured.
        raise AutosquashError(
            f"block(s) {', '.join(map(str, ffn_alone))} remove the FFN but keep the attention, which llama.cpp's "
            "deci architecture cannot run (it drops that attention too); export with --format torch"
        )
    return widths, kv_heads


def _write_tensors(writer: GGUFWriter, arch_name: str, built: BuiltModel) -> dict[str, int]:
    """Add every tensor of `built` to `writer`, laid out as llama.cpp's `arch_name` reads it; returns the count of
    tensors per GGUF type."""
    base, arch = built.base, built.arch
    fam = family(arch.model_type)
    merged = merged_weights(built.model)
    counts: dict[str, int] = {}

    def add(name: str, q) -> None:
        if isinstance(q, QuantizedTensor):
            q = QuantizedTensor(q.type, q.shape, to_gguf(fam, arch_name, name, q.data, arch.head_dim))
        else:
            q = to_gguf(fam, arch_name, name, q, arch.head_dim)
        kind = add_tensor(writer, name, q)
        counts[kind] = counts.get(kind, 0) + 1

    def add_norms(i: int, kind: str) -> None:
        block = base.model.layers[i]
        for short, module, _ in arch.norms(kind):
            add(f"blk.{i}.{short}.weight", _floats(block.get_submodule(module).weight))

    gate: QuantizedTensor | None = None
    for gguf_name, module, variant in quantized_tensors(base, arch, built.plan, built.stats, built.cache):
        q = variant.parts["weight"]
        if merged is not None and gguf_name.startswith("blk."):
            q = merged(f"{module}.weight", q)
        # Each present sublayer's norms go before its first weight; a removed one has none.
        i = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
        if gguf_name.endswith("attn_q"):
            add_norms(i, "attn")
        elif gguf_name.endswith("ffn_gate"):
            add_norms(i, "ffn")
        if fam.fused_gate_up and gguf_name.endswith(("ffn_gate", "ffn_up")):
            if gguf_name.endswith("ffn_gate"):
                gate = q
                continue
            q = _stacked(gate, q, gguf_name)
        add(f"{gguf_name}.weight", q)
        bias = variant.parts.get("bias")  # Qwen2's q/k/v: F32
        if bias is not None:
            add(f"{gguf_name}.bias", bias.numpy())
    add("output_norm.weight", _floats(base.model.norm.weight))
    for name, data in extra_tensors(base.config, arch).items():
        add(name, data)
    return counts


def _floats(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().to("cpu", torch.float32).numpy()


def _stacked(gate: QuantizedTensor | None, up: QuantizedTensor, name: str) -> QuantizedTensor:
    """Phi-3's ffn_up: the gate rows, then the up rows, one tensor of one type."""
    if gate is None or gate.type != up.type:
        raise AutosquashError(
            f"{name}: phi3 holds gate and up as one tensor, so both must take one type "
            f"({gate.type if gate else 'none'} and {up.type})"
        )
    return QuantizedTensor(up.type, (gate.shape[0] + up.shape[0], up.shape[1]), np.concatenate([gate.data, up.data]))


def _write_tokenizer(writer: GGUFWriter, model: ResolvedModel) -> None:
    """The tokenizer copied from the source GGUF, or written from a Hugging Face model's tokenizer.json."""
    source = _tokenizer_gguf(model.source)
    if source is not None:
        copy_tokenizer(writer, source)
    else:
        add_hf_tokenizer(writer, load_tokenizer(model))


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
