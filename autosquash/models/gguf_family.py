"""Each model family as llama.cpp holds it: the GGUF architecture its graph runs under, the hyperparameter keys that
graph reads, and how the family's tensors differ from Hugging Face's (names, q/k row order, norm offsets, fused
projections).

One table, read both ways: `read_layout` turns a GGUF file's keys into the family's transformers config, and
`write_hparams` writes a config's keys for export; tensors go through `hf_name`/`to_gguf` and their inverses. The
keys and tensors are those llama.cpp's converter (convert_hf_to_gguf.py, in the pinned llama-cpp-python sdist)
writes and its loader (src/models/<arch>.cpp) reads; they are written here rather than by importing the
converter, which is a script over a folder of Hugging Face files, not a library over an in-memory model.

Per-layer FFN widths and KV-head counts: of these graphs only llama.cpp's `deci` creates each block's tensors from
its own width (checked in llama.cpp's sources and with llama-cpp-python 0.3.36: the others size every block's
tensors from block 0's). So a plan whose blocks differ in shape is written as `deci`, which computes the llama
graph: possible for the families that graph runs (Llama, Mistral, Qwen2, whose q/k biases it adds), refused for
the rest. A plan that prunes every block alike keeps its family's own graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, RopeScalingType

from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor
from autosquash.formats.gguf import GGUFFile, Tensor, read_tensor, rope_permute, rope_unpermute
from autosquash.models.arch import ATTN_LINEARS, BLOCK_NORMS, FFN_LINEARS, Arch


@dataclass(frozen=True)
class Family:
    """How llama.cpp holds one transformers model type."""

    model_type: str  # transformers' model_type of the family
    gguf_arch: str  # llama.cpp's architecture for it (general.architecture)
    norm_shift: float = 0.0  # Gemma: transformers computes x * (1 + w), llama.cpp x * w, so files hold w + 1
    fused_gate_up: bool = False  # Phi-3: ffn_up holds the gate rows, then the up rows
    sliding: bool = False  # Gemma 2/3: sliding-window layers, with their own rope base (Gemma 3)
    softcaps: bool = False  # Gemma 2: attention and final logits soft-capped
    llama_graph: bool = False  # llama.cpp's llama graph computes it, so per-layer shapes can go to `deci`


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", llama_graph=True),
        Family("mistral", "llama", llama_graph=True),
        Family("qwen2", "qwen2", llama_graph=True),
        Family("qwen3", "qwen3"),
        Family("gemma2", "gemma2", norm_shift=1.0, sliding=True, softcaps=True),
        Family("gemma3_text", "gemma3", norm_shift=1.0, sliding=True),
        Family("phi3", "phi3", fused_gate_up=True),
    )
}
# What a GGUF architecture reads back as: `deci` (per-layer shapes) is the llama graph.
READ_AS = {"llama": "llama", "deci": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}
READ_AS |= {"gemma3": "gemma3_text", "phi3": "phi3"}
# Graphs that rotate interleaved pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM): their files hold q/k rows permuted from
# Hugging Face's rotate-half order. Every other graph here uses the NEOX order, Hugging Face's own.
PERMUTED_QK = ("llama", "deci")
# llama.cpp's default for Gemma 3 files that name no pattern: every 6th block global, the rest sliding.
GEMMA3_PATTERN = 6


def family(model_type: str) -> Family:
    """The family of a transformers model type, or a one-line refusal naming those autosquash writes."""
    if model_type not in FAMILIES:
        raise AutosquashError(f"model type {model_type!r} has no GGUF family; autosquash knows {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def permutes_qk(gguf_arch: str) -> bool:
    """Whether a file of this GGUF architecture holds q/k rows (and their biases, LoRA B rows) interleaved."""
    return gguf_arch in PERMUTED_QK


# ---- hyperparameters ---------------------------------------------------------------------------------------------


def _rope(config: Any) -> dict:
    """The full-attention rope parameters of a config (Gemma 3 keeps one set per layer type)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    return dict(params.get("full_attention", params))


def _layer_types(config: Any, n_layers: int) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)


def write_hparams(
    writer: GGUFWriter, fam: Family, gguf_arch: str, config: Any, arch: Arch, widths: list, heads: list, kv: list
) -> None:
    """The hyperparameters llama.cpp's graph for `gguf_arch` reads, from a transformers config and the plan's
    per-block FFN widths and head counts (lists for `deci`, one number otherwise)."""
    per_layer = gguf_arch == "deci"
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(widths if per_layer else widths[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv if per_layer else kv[0])
    writer.add_rope_dimension_count(arch.head_dim)
    # Stated, not left to llama.cpp's n_embd / n_head of block 0, which is wrong when block 0's heads are pruned.
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(arch.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3's frequencies go in the rope_freqs tensor (extra_tensors)
        raise AutosquashError(f"GGUF export writes default, linear, yarn and llama3 rope; this model's is {kind!r}")
    if fam.sliding:
        _write_sliding(writer, fam, config, arch)
    if fam.softcaps:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _write_sliding(writer: GGUFWriter, fam: Family, config: Any, arch: Arch) -> None:
    """Gemma's sliding-window layers: the window, which blocks use it, and (Gemma 3) their rope base."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != arch.head_dim:
        # llama.cpp scales Gemma's attention by 1/sqrt(head_dim) (all sizes but Gemma-3-27B's).
        raise AutosquashError(
            f"query_pre_attn_scalar {scalar} differs from head_dim {arch.head_dim}; llama.cpp's graph would "
            "scale this model's attention otherwise"
        )
    sliding = [t == "sliding_attention" for t in _layer_types(config, arch.n_layers)]
    if any(sliding):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding)
    local = dict(getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if fam.gguf_arch == "gemma3" and local:
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))


# Llama 3.1 and 3.2 ship these rope parameters (their config.json); a rope_freqs tensor is matched against them.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """llama.cpp's rope_freqs of a `llama3` rope: each frequency's divisor, default over scaled (transformers'
    own computation of the scaled frequencies)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(head_dim=head_dim, num_attention_heads=1, hidden_size=head_dim, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (default / scaled).float()


def extra_tensors(config: Any, arch: Arch) -> dict[str, np.ndarray]:
    """Tensors a family's graph reads beyond the weights: Llama 3.1's per-frequency rope divisors."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return {}
    return {"rope_freqs.weight": _rope_factors(rope, arch.head_dim).numpy()}


def _llama3_rope(rope: dict, factors: torch.Tensor, head_dim: int, where: str) -> dict:
    """The `llama3` rope parameters that give a file's rope_freqs (Llama 3.1/3.2's, with their scaling factor);
    other divisors are refused rather than guessed."""
    guess = {**rope, "rope_type": "llama3", "factor": float(factors.max()), **_LLAMA3_ROPE}
    if factors.shape == (head_dim // 2,) and torch.allclose(_rope_factors(guess, head_dim), factors, rtol=1e-4):
        return guess
    raise AutosquashError(f"{where}: its rope_freqs are not Llama 3's rope scaling; autosquash cannot read them")


def _per_layer(value: Any, n_layers: int) -> list[int]:
    """A GGUF hyperparameter that is one number for all blocks, or one per block (deci)."""
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


@dataclass(frozen=True)
class Layout:
    """A GGUF model file as autosquash reads it: its family, the transformers config of its widest block, each
    block's FFN width and KV-head count (0 for a removed sublayer; they differ only in `deci` files), and its tensors
    by name."""

    gguf_arch: str
    family: Family
    config: Any
    widths: list[int]
    kv_heads: list[int]
    tensors: dict[str, Tensor]


def read_layout(reader: GGUFFile, where: str = "GGUF file") -> Layout:
    """A GGUF file's family, config and per-block shapes; a family autosquash does not read is one line naming
    those it does."""
    arch_name = _gguf_arch(reader, where)
    tensors = {t.name: t for t in reader.tensors}

    def kv(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"{arch_name}.{key}")
        if field is None and default is None:
            raise AutosquashError(f"{where} lacks {arch_name}.{key}")
        return default if field is None else field.value

    n_layers = int(kv("block_count"))
    hidden = int(kv("embedding_length"))
    widths = _per_layer(kv("feed_forward_length"), n_layers)
    heads = _per_layer(kv("attention.head_count"), n_layers)
    kv_heads = _per_layer(kv("attention.head_count_kv", heads), n_layers)
    head_dim = int(kv("attention.key_length", 0) or kv("rope.dimension_count", hidden // max(max(heads), 1)))
    if int(kv("rope.dimension_count", head_dim)) != head_dim:
        # Phi-4-mini's partial rotary dimensions: refused rather than rotated over the whole head.
        raise AutosquashError(
            f"{where}: rope turns {kv('rope.dimension_count')} of each head's {head_dim} dimensions; autosquash reads "
            "models whose rope turns the whole head"
        )
    if "token_embd.weight" not in tensors:
        raise AutosquashError(f"{where} lacks token_embd.weight")

    def token(key: str) -> int | None:
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else int(field.value)

    cfg: dict[str, Any] = dict(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=max(widths) or hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=max(heads) or 1,
        num_key_value_heads=max(kv_heads) or 1,
        head_dim=head_dim,
        max_position_embeddings=int(kv("context_length")),
        rms_norm_eps=float(kv("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("padding_token_id"),
        rope_parameters=_read_rope(kv, tensors.pop("rope_freqs.weight", None), head_dim, where),
    )
    fam, model_type = _read_family(cfg, FAMILIES[READ_AS[arch_name]], kv, tensors)
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **cfg)
    layout = Layout(arch_name, fam, config, widths, kv_heads, tensors)
    _check_shapes(layout, heads, where)
    return layout


def _gguf_arch(reader: GGUFFile, where: str) -> str:
    """The file's GGUF architecture, refused in one line unless autosquash reads it."""
    name = reader.fields.get("general.architecture")
    arch_name = str(name.value) if name is not None else None
    if arch_name not in READ_AS:
        raise AutosquashError(
            f"{where}: GGUF architecture {arch_name!r}; autosquash reads {', '.join(sorted(READ_AS))} "
            f"(the families {', '.join(FAMILIES)})"
        )
    return arch_name


def _read_rope(kv, freqs: Tensor | None, head_dim: int, where: str) -> dict[str, Any]:
    """The transformers rope parameters of the file's rope keys, and of its rope_freqs tensor (Llama 3's scaling)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(kv("rope.freq_base", 10000.0))}
    scaling = kv("rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        rope |= {"rope_type": scaling, "factor": float(kv("rope.scaling.factor"))}
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(kv("rope.scaling.original_context_length"))
    elif scaling != "none":
        raise AutosquashError(f"{where}: rope scaling {scaling!r}; autosquash reads linear and yarn")
    return rope if freqs is None else _llama3_rope(rope, read_tensor(freqs), head_dim, where)


def _read_family(cfg: dict, fam: Family, kv, tensors: dict[str, Tensor]) -> tuple[Family, str]:
    """The family the file reads as and its transformers model type; the family's own keys (Gemma's windows and
    softcaps, Phi-3's marker) added to `cfg`."""
    n_layers = cfg["num_hidden_layers"]
    if fam.llama_graph and any(f"blk.{i}.attn_q.bias" in tensors for i in range(n_layers)):
        if fam.model_type == "llama":  # a deci/llama file with q/k/v biases is a pruned Qwen2
            fam = FAMILIES["qwen2"]
    if fam.sliding:
        _read_sliding(cfg, fam, kv, n_layers)
    if fam.softcaps:
        cfg["attn_logit_softcapping"] = float(kv("attn_logit_softcapping", 0.0)) or None
    if fam.sliding or fam.softcaps:
        cfg["final_logit_softcapping"] = float(kv("final_logit_softcapping", 0.0)) or None
        cfg["query_pre_attn_scalar"] = cfg["head_dim"]
    if fam.model_type == "phi3":
        cfg["autosquash_family"] = "phi3"  # loads as the Llama it is (models/phi3.py), exports as phi3
        return fam, "llama"
    return fam, fam.model_type


def _expected_shapes(layout: Layout, heads: list[int]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the header's sizes give it, in ggml's order (the row length first)."""
    cfg, arch = layout.config, Arch.from_config(layout.config)
    e, d = arch.hidden_size, arch.head_dim
    out = {"token_embd.weight": (e, arch.vocab_size), "output.weight": (e, arch.vocab_size), "output_norm.weight": (e,)}
    for i in range(cfg.num_hidden_layers):
        q, kv, ff = heads[i] * d, layout.kv_heads[i] * d, layout.widths[i]
        linears = {"attn_q": (e, q), "attn_k": (e, kv), "attn_v": (e, kv), "attn_output": (q, e)}
        linears |= {"attn_qkv": (e, q + 2 * kv), "ffn_gate": (e, ff), "ffn_down": (ff, e)}
        linears["ffn_up"] = (e, 2 * ff if layout.family.fused_gate_up else ff)
        for short, shape in linears.items():
            out[f"blk.{i}.{short}.weight"] = shape
            out[f"blk.{i}.{short}.bias"] = shape[1:]
        for kind in ("attn", "ffn"):
            out |= {f"blk.{i}.{n}.weight": (size,) for n, _, size in arch.norms(kind)}
    return out


def _check_shapes(layout: Layout, heads: list[int], where: str) -> None:
    """A header that contradicts the file's tensors (a width edited, a tensor of another model) is one line here,
    before anything is priced or loaded: llama.cpp would refuse the file."""
    expected = _expected_shapes(layout, heads)
    for name, t in layout.tensors.items():
        want = expected.get(name)
        if want is not None and tuple(int(n) for n in t.shape) != want:
            raise AutosquashError(
                f"{where}: tensor {name} has shape {tuple(int(n) for n in t.shape)} (ggml order) where the header's "
                f"sizes give {want}; the header and the tensors disagree"
            )


def _read_sliding(cfg: dict, fam: Family, kv, n_layers: int) -> None:
    """Gemma's layer types from the window pattern (llama.cpp's default when the file names none)."""
    window = int(kv("attention.sliding_window", 0))
    pattern = kv("attention.sliding_window_pattern", 0)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        n = int(pattern) or (GEMMA3_PATTERN if fam.gguf_arch == "gemma3" else 2)
        sliding = [i % n < n - 1 for i in range(n_layers)]
    if window == 0:
        sliding = [False] * n_layers
    cfg["sliding_window"] = window or None
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    if fam.gguf_arch == "gemma3":
        full = cfg.pop("rope_parameters")
        local = {"rope_type": "default", "rope_theta": float(kv("rope.freq_base_swa", 10000.0))}
        cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}


# ---- tensors -----------------------------------------------------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def block_tensor_paths(arch: Arch) -> dict[str, str]:
    """GGUF short name -> module path inside a block, for every linear and norm a block of `arch` holds."""
    paths = dict(ATTN_LINEARS + FFN_LINEARS)
    for kind in ("attn", "ffn"):
        paths |= {name: path for name, path, _ in BLOCK_NORMS[arch.model_type][kind]}
    return paths


def is_norm(gguf_name: str) -> bool:
    """Whether a GGUF tensor is a norm weight (Gemma's files hold those shifted by one)."""
    return gguf_name.endswith("norm.weight")


def to_gguf(fam: Family, gguf_arch: str, name: str, data: np.ndarray, head_dim: int) -> np.ndarray:
    """A float tensor (or rows of quantized blocks) as the file of `gguf_arch` holds it: q/k rows interleaved for
    the llama graph, norms shifted for Gemma."""
    if permutes_qk(gguf_arch) and name.split(".")[-2] in ("attn_q", "attn_k"):
        data = rope_permute(data, head_dim)
    if fam.norm_shift and is_norm(name):
        data = data + np.float32(fam.norm_shift)
    return data


def from_gguf(fam: Family, gguf_arch: str, name: str, w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `to_gguf` on a decoded tensor."""
    if permutes_qk(gguf_arch) and name.split(".")[-2] in ("attn_q", "attn_k"):
        w = rope_unpermute(w, head_dim)
    if fam.norm_shift and is_norm(name):
        w = w - fam.norm_shift
    return w


def hf_state(layout: Layout, read) -> dict[str, torch.Tensor]:
    """The transformers state dict of a uniform (non-deci) file: every tensor decoded by `read`, named and
    transformed as the family's transformers model holds it; Phi-3's fused projections split."""
    arch = Arch.from_config(layout.config)
    paths = block_tensor_paths(arch)
    state: dict[str, torch.Tensor] = {}
    for name, t in layout.tensors.items():
        state.update(_pieces(layout, arch, paths, name, read(t)))
    if arch.tied_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_sources(layout: Layout) -> dict[str, QuantizedTensor]:
    """The file's quantized matrices as its own blocks, under the names `hf_state` gives their decoded weights and
    in the same row order (every move it makes of a matrix, the q/k un-permutation and the splits of fused
    projections, moves whole rows): what a plan asking a tensor's own type keeps instead of re-quantizing it. A
    matrix whose rows stay in place is a view of the file's memory map, not a copy."""
    arch = Arch.from_config(layout.config)
    paths = block_tensor_paths(arch)
    out: dict[str, QuantizedTensor] = {}
    for name, t in layout.tensors.items():
        kind = t.tensor_type.name
        if len(t.shape) != 2 or kind in ("F32", "F16") or kind not in QUANTIZABLE_TYPES:
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])
        data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        for key, order in _pieces(layout, arch, paths, name, torch.arange(rows).unsqueeze(1)):
            idx = order.reshape(-1).numpy()
            first = int(idx[0])
            in_place = bool(np.array_equal(idx, np.arange(first, first + idx.size)))
            blocks = data[first : first + idx.size] if in_place else data[idx]
            out[key] = QuantizedTensor(kind, (idx.size, cols), blocks)
    if arch.tied_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _pieces(layout: Layout, arch: Arch, paths: dict, name: str, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of each transformers tensor GGUF tensor `name` holds, `w` (its values, or any
    per-row tensor) moved from the file's rows as the family's model holds them."""
    parts = name.split(".")
    w = from_gguf(layout.family, layout.gguf_arch, name, w, arch.head_dim)
    if parts[0] in _TOP:
        return [(f"{_TOP[parts[0]]}.{parts[-1]}", w)]
    if parts[0] != "blk" or len(parts) != 4:
        raise AutosquashError(f"GGUF tensor {name} is not one autosquash reads for {layout.gguf_arch}")
    prefix, short, kind = f"model.layers.{parts[1]}", parts[2], parts[3]
    if short == "attn_qkv":
        sizes = [arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim]
        projs = ("q_proj", "k_proj", "v_proj")
        return [(f"{prefix}.self_attn.{p}.{kind}", piece) for p, piece in zip(projs, w.split(sizes), strict=True)]
    if short == "ffn_up" and layout.family.fused_gate_up:
        gate, up = w.chunk(2, dim=0)
        return [(f"{prefix}.mlp.gate_proj.{kind}", gate), (f"{prefix}.mlp.up_proj.{kind}", up)]
    if short in paths:
        return [(f"{prefix}.{paths[short]}.{kind}", w)]
    raise AutosquashError(f"GGUF tensor {name} is not one autosquash reads for {layout.gguf_arch}")
