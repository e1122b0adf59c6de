"""Read the GGUF files autosquash writes back into a float model, `deci` ones included.

transformers refuses the `deci` architecture (per-layer FFN widths and head counts), so this builds
the LlamaForCausalLM itself: each tensor decoded by autosquash's dequantizer (the arithmetic a trial
evaluates), q/k rows put back in Hugging Face's order, narrower linears and removed sublayers as
compress() builds them (DESIGN.md §2).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from autosquash.compress.apply import RemovedAttention, RemovedMLP
from autosquash.compress.lowrank import linear_with
from autosquash.compress.plan import ATTN_LINEARS, FFN_LINEARS
from autosquash.compress.quant import QuantizedTensor, dequantize
from autosquash.errors import AutosquashError
from autosquash.export.gguf_file import rope_unpermute

READABLE_ARCHS = ("llama", "deci")


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file from its first key, without parsing the whole (large) header.

    GGUF writers (the gguf package's, llama.cpp's) put general.architecture first; otherwise the full
    header is read.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] != b"GGUF" or len(head) < 32:
        raise AutosquashError(f"{path} is not a GGUF file")
    offset = 4 + 4 + 8 + 8  # magic, version, tensor count, key/value count
    (key_len,) = struct.unpack_from("<Q", head, offset)
    key = head[offset + 8 : offset + 8 + key_len]
    offset += 8 + key_len
    if key == b"general.architecture" and len(head) >= offset + 12:
        vtype, value_len = struct.unpack_from("<IQ", head, offset)
        if vtype == GGUFValueType.STRING and len(head) >= offset + 12 + value_len:
            return head[offset + 12 : offset + 12 + value_len].decode()
    try:
        return str(GGUFReader(path).fields["general.architecture"].contents())
    except (ValueError, KeyError, IndexError) as e:
        raise AutosquashError(f"{path} is not a readable GGUF file ({type(e).__name__})") from None


def read_tensor(t) -> torch.Tensor:
    """A GGUF tensor (gguf.ReaderTensor) decoded to float32 by autosquash's dequantizer, in numpy (rows, cols) order."""
    cols = int(t.shape[0])
    rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    data = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1)
    w = dequantize(QuantizedTensor(t.tensor_type.name, (rows, cols), data))
    return w.reshape(cols) if len(t.shape) == 1 else w


def _per_layer(value, n_layers: int) -> list[int]:
    """A GGUF hyperparameter that is one number for all blocks (llama) or one per block (deci)."""
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layers


def _config(reader: GGUFReader):
    """A LlamaConfig holding every block's widest shape (narrower blocks get their own linears), and the
    per-block FFN widths and KV-head counts."""
    from transformers import LlamaConfig

    arch_name = str(reader.fields["general.architecture"].contents())
    if arch_name not in READABLE_ARCHS:
        raise AutosquashError(f"GGUF architecture {arch_name!r}; autosquash reads {', '.join(READABLE_ARCHS)}")

    def kv(key: str, default=None):
        field = reader.fields.get(f"{arch_name}.{key}")
        if field is None and default is None:
            raise AutosquashError(f"GGUF file lacks {arch_name}.{key}")
        return default if field is None else field.contents()

    n_layers = int(kv("block_count"))
    hidden = int(kv("embedding_length"))
    widths = _per_layer(kv("feed_forward_length"), n_layers)
    heads = _per_layer(kv("attention.head_count"), n_layers)
    kv_heads = _per_layer(kv("attention.head_count_kv"), n_layers)
    head_dim = int(kv("rope.dimension_count", hidden // max(max(heads), 1)))

    def token(key: str) -> int | None:
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return None if field is None else int(field.contents())

    config = LlamaConfig(
        vocab_size=_vocab(reader),
        hidden_size=hidden,
        intermediate_size=max(widths) or hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=max(heads) or 1,
        num_key_value_heads=max(kv_heads) or 1,
        head_dim=head_dim,
        max_position_embeddings=int(kv("context_length")),
        rms_norm_eps=float(kv("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(kv("rope.freq_base", 10000.0))},
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("padding_token_id"),
    )
    return config, widths, kv_heads


def _vocab(reader: GGUFReader) -> int:
    """Rows of the embedding table (GGUF shapes list the row length first)."""
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
    if not embd:
        raise AutosquashError("GGUF file lacks token_embd.weight")
    return int(embd[0].shape[1])


def read_gguf_config(path: str | Path):
    """The LlamaConfig of a `llama` or `deci` GGUF file (widest block shapes), without decoding its tensors."""
    return _config(GGUFReader(path))[0]


def read_gguf_model(path: str | Path) -> torch.nn.Module:
    """The float32 LlamaForCausalLM (eval mode) of a `llama` or `deci` GGUF file, per-layer shapes included."""
    from transformers import LlamaForCausalLM

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    config, widths, kv_heads = _config(reader)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            _fill_block(block, i, tensors, config.head_dim, widths[i], kv_heads[i])
        model.model.embed_tokens.weight.data = read_tensor(tensors["token_embd.weight"])
        if not config.tie_word_embeddings:
            model.lm_head.weight.data = read_tensor(tensors["output.weight"])
        model.model.norm.weight.data = read_tensor(tensors["output_norm.weight"])
    return model.eval()


def _fill_block(block, i: int, tensors: dict, head_dim: int, ffn_width: int, kv_heads: int) -> None:
    """Block `i`'s norms and linears from the file; a sublayer with width 0 is removed, as compress() does."""
    if kv_heads == 0:
        block.self_attn = RemovedAttention()
    else:
        block.input_layernorm.weight.data = read_tensor(tensors[f"blk.{i}.attn_norm.weight"])
    if ffn_width == 0:
        block.mlp = RemovedMLP()
    else:
        block.mlp.intermediate_size = ffn_width
        block.post_attention_layernorm.weight.data = read_tensor(tensors[f"blk.{i}.ffn_norm.weight"])
    for name, path in ATTN_LINEARS + FFN_LINEARS:
        t = tensors.get(f"blk.{i}.{name}.weight")
        if t is None:
            continue
        w = read_tensor(t)
        if name in ("attn_q", "attn_k"):
            w = rope_unpermute(w, head_dim)
        parent, attr = path.rsplit(".", 1)
        block.get_submodule(parent).register_module(attr, linear_with(w.contiguous()))


def gguf_tokens(path: str | Path) -> list[str]:
    """The vocabulary (tokenizer.ggml.tokens) of a GGUF file, in id order."""
    field = GGUFReader(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise AutosquashError(f"{path} holds no tokenizer (tokenizer.ggml.tokens)")
    return list(field.contents())


def tokens_match(tokenizer, tokens: list[str]) -> bool:
    """Whether a transformers tokenizer has exactly `tokens` as its vocabulary, id for id."""
    return len(tokenizer) == len(tokens) and tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
