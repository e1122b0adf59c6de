"""A Hugging Face byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM, GPT-2 style) as GGUF tokenizer fields.

llama.cpp rebuilds such a tokenizer from the token strings in id order, their types, the merges, the
special token ids and the name of its pre-tokenizer, the step that splits text before BPE runs. The name is
read here from the tokenizer's own pre-tokenizer (tokenizer.json), matched against the ones llama.cpp
implements; an unknown one is refused, since a file with the wrong one would load and split text otherwise.
SentencePiece tokenizers (Llama 2, Mistral v0.1, Phi-3, Gemma) are not written yet.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import GGUFWriter, TokenType

from autosquash.errors import AutosquashError

# Split patterns of the pre-tokenizers llama.cpp names, as tokenizer.json holds them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one

# A pre-tokenizer's steps -> llama.cpp's name for it (tokenizer.ggml.pre).
PRE_TOKENIZERS: dict[tuple, str] = {
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}


def _steps(pre: dict | None) -> tuple:
    """The pre-tokenizer as (kind, the setting that tells its variants apart) per step."""
    if pre is None:
        return ()
    out = []
    for step in pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]:
        kind = step.get("type")
        if kind == "Split":
            out.append((kind, step.get("pattern", {}).get("Regex")))
        elif kind == "ByteLevel":
            out.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append((kind, bool(step.get("individual_digits", False))))
        else:
            out.append((kind, None))
    return tuple(out)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (as a dict)."""
    steps = _steps(spec.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        raise AutosquashError(
            f"the tokenizer's pre-tokenizer ({', '.join(k for k, _ in steps) or 'none'}) is not one autosquash can "
            "name for llama.cpp (Llama 3's, Qwen2's, SmolLM's, GPT-2's); export with --format torch"
        )
    return name


def add_hf_tokenizer(writer: GGUFWriter, tokenizer: Any) -> None:
    """Write a transformers fast tokenizer (byte-level BPE) as GGUF's tokenizer.* fields."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AutosquashError("GGUF export needs a fast (tokenizer.json) tokenizer; export with --format torch")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not any(s == ("ByteLevel", s[1]) for s in _steps(spec.get("pre_tokenizer"))):
        raise AutosquashError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')} "
            "(SentencePiece models are not written yet); export with --format torch"
        )
    pre = pre_tokenizer_name(spec)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = TokenType.NORMAL
    for i, a in added.items():
        types[i] = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    # Whether encoding starts with BOS, as the tokenizer itself does it (a template or a flag).
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
