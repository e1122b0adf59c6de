"""The architecture facts that compression and the cost model need, read from a model config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosquash.errors import AutosquashError

# Llama-style decoders: the same linears (q/k/v/o, gate/up/down); their blocks differ in their RMS norms.
# phi3 loads as the Llama it is (models/phi3.py), its config tagged `autosquash_family: phi3`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")

# Every norm weight of a block, by the sublayer it belongs to (a removed sublayer deploys none of them):
# (GGUF short name as llama.cpp names it, module path inside the block, "hidden" or "head" sized).
_LLAMA_NORMS = {
    "attn": (("attn_norm", "input_layernorm", "hidden"),),
    "ffn": (("ffn_norm", "post_attention_layernorm", "hidden"),),
}
_QK_NORMS = (("attn_q_norm", "self_attn.q_norm", "head"), ("attn_k_norm", "self_attn.k_norm", "head"))
_GEMMA_NORMS = {
    "attn": (("attn_norm", "input_layernorm", "hidden"), ("post_attention_norm", "post_attention_layernorm", "hidden")),
    "ffn": (
        ("ffn_norm", "pre_feedforward_layernorm", "hidden"),
        ("post_ffw_norm", "post_feedforward_layernorm", "hidden"),
    ),
}
BLOCK_NORMS: dict[str, dict[str, tuple[tuple[str, str, str], ...]]] = {
    "llama": _LLAMA_NORMS,
    "mistral": _LLAMA_NORMS,
    "phi3": _LLAMA_NORMS,
    "qwen2": _LLAMA_NORMS,
    "qwen3": {**_LLAMA_NORMS, "attn": _LLAMA_NORMS["attn"] + _QK_NORMS},
    "gemma2": _GEMMA_NORMS,
    "gemma3_text": {**_GEMMA_NORMS, "attn": _GEMMA_NORMS["attn"] + _QK_NORMS},
}

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


def _biased(model_type: str, cfg: dict) -> tuple[str, ...]:
    """The block linears with a bias: Qwen2's q/k/v always; any family's attention or MLP linears where its
    config says `attention_bias` / `mlp_bias`."""
    names: list[str] = []
    if model_type == "qwen2":
        names += ["attn_q", "attn_k", "attn_v"]
    if cfg.get("attention_bias"):
        names += [n for n, _ in ATTN_LINEARS if n not in names]
    if cfg.get("mlp_bias"):
        names += [n for n, _ in FFN_LINEARS]
    return tuple(names)


@dataclass(frozen=True)
class Arch:
    """Shape of a Llama-style decoder-only transformer."""

    model_type: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    biased: tuple[str, ...] = ()  # GGUF short names of the block linears that carry a bias (Qwen2's q/k/v)

    def norms(self, kind: str) -> list[tuple[str, str, int]]:
        """The norm weights of a block's `kind` ("attn" or "ffn") sublayer: (GGUF short name, module path
        inside the block, length)."""
        size = {"hidden": self.hidden_size, "head": self.head_dim}
        return [(name, path, size[dim]) for name, path, dim in BLOCK_NORMS[self.model_type][kind]]

    @property
    def n_params(self) -> int:
        """Parameters of the uncompressed model: embeddings (and the output head when untied), every block's
        linears, their biases and norms, the final norm."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        rows = {"attn_q": q, "attn_k": kv, "attn_v": kv, "attn_output": h, "ffn_gate": i, "ffn_up": i, "ffn_down": h}
        linears = (q + 2 * kv) * h + h * q + 3 * h * i
        block = linears + sum(rows[n] for n in self.biased) + sum(n for k in ("attn", "ffn") for *_, n in self.norms(k))
        return self.vocab_size * h * (1 if self.tied_embeddings else 2) + self.n_layers * block + h

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        """Build from a transformers config object or a config.json dict."""
        cfg = config if isinstance(config, dict) else config.to_dict()
        # Phi-3 runs as the Llama it is (models/phi3.py); its config still says which family it exports as.
        model_type = cfg.get("autosquash_family") or cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise AutosquashError(
                f"model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            n_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            sizes = {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")}
            sizes |= {k: cfg[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim") if cfg.get(k)}
            bad = [f"{k} {v}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
            if bad:
                raise AutosquashError(f"model config: sizes must be positive integers; got {', '.join(bad)}")
            kv = int(cfg.get("num_key_value_heads") or n_heads)
            if n_heads % kv:
                raise AutosquashError(f"model config: {n_heads} attention heads do not split into {kv} KV groups")
            if not cfg.get("head_dim") and hidden % n_heads:
                raise AutosquashError(f"model config: hidden_size {hidden} does not divide into {n_heads} heads")
            return cls(
                model_type=model_type,
                n_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or hidden // n_heads),
                vocab_size=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                biased=_biased(model_type, cfg),
            )
        except KeyError as e:
            raise AutosquashError(f"model config lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Arch:
        """Read a Hugging Face config.json (no weights needed)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            return cls.from_config(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise AutosquashError(f"cannot read model config {p}: {e}") from None
