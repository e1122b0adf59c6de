"""The trial's LoRA healing adapter: named by the tensors it adapts, written as a GGUF LoRA file, applied on load.

The GGUF adapter follows llama.cpp (convert_lora_to_gguf.py, llama-adapter.cpp): general.type "adapter",
adapter.type "lora", adapter.lora.alpha, the base model's general.architecture, and per adapted tensor
`<tensor>.lora_a` (rank, in) and `<tensor>.lora_b` (out, rank) in numpy order; llama.cpp scales B·A by
alpha / rank, as peft does. q/k rows of lora_b are rope-permuted like the base model's q/k rows (in the llama
graph's files only); Phi-3's gate and up pairs are fused as its file fuses the two weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from gguf import GGUFType, Keys

from autosquash.compress.quantize import quantize
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import QuantizedTensor
from autosquash.formats.gguf import (
    GGUFFile,
    add_tensor,
    gguf_writer,
    open_gguf,
    read_tensor,
    rope_permute,
    rope_unpermute,
)
from autosquash.models.arch import ATTN_LINEARS, FFN_LINEARS, Arch
from autosquash.models.gguf_family import FAMILIES, READ_AS, family, permutes_qk

# Module path inside a block <-> GGUF short name, e.g. "self_attn.q_proj" <-> "attn_q".
_SHORT = {path: name for name, path in ATTN_LINEARS + FFN_LINEARS}
_PATH = {name: path for name, path in ATTN_LINEARS + FFN_LINEARS}
# A linear's own weight is its `.weight` tensor; a factor held by a submodule (LowRankLinear's `lr_a`) is the
# tensor named after that submodule (`.lr_a`), as every form names its parts.
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(\w+\.\w+)(?:\.(\w+))?$")
_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(\w+)$")

Adapter = dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor name -> (A: rank x in, B: out x rank)


def tensor_name(module_path: str) -> str:
    """The deployed tensor a block linear's module holds: model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight."""
    m = _MODULE.match(module_path)
    if not m or m[2] not in _SHORT:
        raise AutosquashError(f"{module_path} is not a block linear of a Llama-style model")
    return f"blk.{m[1]}.{_SHORT[m[2]]}.{m[3] or 'weight'}"


def module_path(name: str) -> str:
    """The module that holds deployed tensor `name` (the inverse of `tensor_name`)."""
    m = _TENSOR.match(name)
    if not m or m[2] not in _PATH:
        raise AutosquashError(f"{name!r} is not a block linear's tensor (blk.N.<attn_q|...|ffn_down>.weight)")
    return f"model.layers.{m[1]}.{_PATH[m[2]]}" + ("" if m[3] == "weight" else f".{m[3]}")


def has_adapter(model: torch.nn.Module) -> bool:
    """Whether a peft LoRA adapter is attached to `model` (healing kept it apart from the weights)."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def adapter_weights(model: torch.nn.Module) -> tuple[Adapter, float]:
    """The LoRA adapter attached to `model` (peft) by adapted tensor name, and its alpha; ({}, 0) when none."""
    out: Adapter = {}
    alpha = 0.0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        path = name.removeprefix("base_model.model.")
        out[tensor_name(path)] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
        alpha = float(module.lora_alpha["default"])
    return out, alpha


def apply_adapter(model: torch.nn.Module, adapter: Adapter, alpha: float) -> torch.nn.Module:
    """`model` with `adapter` attached as a peft LoRA adapter, in eval mode: the forward pass healing trained.
    Each tensor keeps its own rank, scaled by alpha / that rank as llama.cpp scales it (Phi-3's fused gate/up pairs
    have twice the rank of the others)."""
    from peft import LoraConfig, get_peft_model

    if not adapter:
        raise AutosquashError("the adapter adapts no tensor")
    paths = {name: module_path(name) for name in adapter}
    for name, (a, b) in adapter.items():
        try:
            w = model.get_submodule(paths[name]).weight
        except AttributeError:
            raise AutosquashError(f"the adapter adapts {name}, which the model does not have") from None
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise AutosquashError(
                f"adapter tensors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                f"the model's weight is {tuple(w.shape)}"
            )
    ranks = {paths[name]: int(a.shape[0]) for name, (a, _) in adapter.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted(paths.values()),
        rank_pattern={f"^{re.escape(p)}$": r for p, r in ranks.items() if r != rank},
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, (a, b) in adapter.items():
            layer = peft_model.base_model.model.get_submodule(paths[name])
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return peft_model.eval()


def lora_path(model_path: str | Path) -> Path:
    """Where the adapter of a GGUF model file goes: m.gguf -> m.lora.gguf."""
    return Path(model_path).with_suffix(".lora.gguf")


def write_gguf_lora(path: str | Path, adapter: Adapter, alpha: float, arch: Arch, gguf_arch: str) -> int:
    """Write `adapter` as a llama.cpp GGUF LoRA file for a model of architecture `gguf_arch`; returns its tensor count.

    A and B go in F16, the type healing rounded them to (and the cost model prices).
    """
    for name in adapter:
        if not name.endswith(".weight"):
            raise AutosquashError(f"GGUF holds no low-rank factors; cannot write an adapter of {name}")
    with gguf_writer(path, gguf_arch, GGUFType.ADAPTER) as writer:
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_rope_dimension_count(arch.head_dim)  # lets a reader undo the q/k row permutation
        if family(arch.model_type).fused_gate_up:
            adapter = _fuse_gate_up(adapter)
        for name, (a, b) in sorted(adapter.items(), key=lambda item: _order(item[0])):
            qa, qb = quantize(a, "F16"), quantize(b, "F16")
            if permutes_qk(gguf_arch) and name.split(".")[2] in ("attn_q", "attn_k"):
                qb = QuantizedTensor(qb.type, qb.shape, rope_permute(qb.data, arch.head_dim))
            add_tensor(writer, f"{name}.lora_a", qa)
            add_tensor(writer, f"{name}.lora_b", qb)
    return 2 * len(adapter)


def _fuse_gate_up(adapter: Adapter) -> Adapter:
    """Phi-3's file holds gate and up as one ffn_up (gate rows first): their pairs become one pair of rank
    R = r_gate + r_up, A stacked and B block-diagonal, whose product is exactly the two products stacked. llama.cpp
    scales each tensor's product by alpha / its rank, so each block of B is scaled by R / its own rank."""
    out = dict(adapter)
    ffn = {n.replace("ffn_gate", "ffn_up") for n in adapter if n.split(".")[2] in ("ffn_gate", "ffn_up")}
    for up_name in sorted(ffn):
        name = up_name.replace("ffn_up", "ffn_gate")
        pairs = [out.pop(name, None), out.pop(up_name, None)]
        n_ff, n_in = next((b.shape[0], a.shape[1]) for a, b in filter(None, pairs))
        (ag, bg), (au, bu) = (p or (torch.zeros((0, n_in)), torch.zeros((n_ff, 0))) for p in pairs)
        rank = ag.shape[0] + au.shape[0]
        b = torch.zeros((bg.shape[0] + bu.shape[0], rank), dtype=bg.dtype)
        if ag.shape[0]:
            b[: bg.shape[0], : ag.shape[0]] = bg * (rank / ag.shape[0])
        if au.shape[0]:
            b[bg.shape[0] :, ag.shape[0] :] = bu * (rank / au.shape[0])
        out[up_name] = (torch.cat([ag, au]), b)
    return out


def _order(name: str) -> tuple[int, int]:
    """Tensors in the file's block order: block, then q, k, v, o, gate, up, down."""
    _, block, short, _ = name.split(".")
    return int(block), list(_PATH).index(short)


def _field(reader: GGUFFile, key: str, path: Path):
    field = reader.fields.get(key)
    if field is None:
        raise AutosquashError(f"{path} is not a GGUF LoRA adapter: it has no {key}")
    return field.contents()


def read_gguf_lora(path: str | Path) -> tuple[Adapter, float, str]:
    """A GGUF LoRA file's adapter (q/k rows back in Hugging Face order), its alpha and its architecture."""
    p = Path(path)
    if not p.is_file():
        raise AutosquashError(f"LoRA adapter {p} does not exist")
    reader = open_gguf(p)
    kinds = [reader.fields[k].contents() if k in reader.fields else None for k in ("general.type", Keys.Adapter.TYPE)]
    if kinds != ["adapter", "lora"]:
        raise AutosquashError(f"{p} is a GGUF file but not a LoRA adapter (general.type, adapter.type: {kinds})")
    alpha = float(_field(reader, Keys.Adapter.LORA_ALPHA, p))
    head_dim = _head_dim(reader, p)
    arch_name = str(_field(reader, "general.architecture", p))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, which = t.name.rpartition(".")
        if which not in ("lora_a", "lora_b"):
            raise AutosquashError(f"{p}: tensor {t.name} is neither a .lora_a nor a .lora_b")
        w = read_tensor(t)
        if which == "lora_b" and permutes_qk(arch_name) and base.split(".")[2] in ("attn_q", "attn_k"):
            w = rope_unpermute(w, head_dim)
        parts.setdefault(base, {})[which] = w
    missing = [n for n, ab in parts.items() if len(ab) != 2]
    if missing:
        raise AutosquashError(f"{p}: {missing[0]} lacks its lora_a or lora_b")
    adapter = {n: (ab["lora_a"], ab["lora_b"]) for n, ab in parts.items()}
    if arch_name in READ_AS and FAMILIES[READ_AS[arch_name]].fused_gate_up:
        for name in [n for n in adapter if n.split(".")[2] == "ffn_up"]:
            a, b = adapter.pop(name)
            gate, up = b.chunk(2, dim=0)  # exact: the rows of the fused product, split
            adapter[name.replace("ffn_up", "ffn_gate")], adapter[name] = (a, gate), (a, up)
    return adapter, alpha, arch_name


def _head_dim(reader: GGUFFile, path: Path) -> int:
    """The q/k head size, which undoing the rope permutation of lora_b's rows needs."""
    return int(_field(reader, f"{_field(reader, 'general.architecture', path)}.rope.dimension_count", path))
