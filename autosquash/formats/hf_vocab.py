"""A Hugging Face fast tokenizer (tokenizer.json) as GGUF tokenizer fields, for llama.cpp to encode text exactly
as transformers does. Two kinds are written, and any other is refused in one line:

- byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2) as llama.cpp's "gpt2" model: the token strings in id order,
  their types, the merges, the special token ids and the name of its pre-tokenizer, the step that splits text
  before BPE runs. The name is read from the tokenizer's own pre-tokenizer, matched against the ones llama.cpp
  implements; an unknown one is refused, since a file with the wrong one would load and split text otherwise.
- SentencePiece-style BPE (Llama 2, Mistral v0.1, Phi-3, Gemma: "▁" for a space, <0xNN> byte fallback) as its
  "llama" model, which has scores and no merges. llama.cpp joins the adjacent pair whose joined text is the token
  of highest score, leftmost first, until no pair makes a token (llm_tokenizer_spm in llama-vocab.cpp);
  transformers joins the pair of lowest merge rank, leftmost first. So the token a merge of rank r creates
  scores -r, and both join in the same order. A token several merges create scores its first rank: tokenizers
  converted from SentencePiece (Gemma's, Llama 2's) rank all the merges that create one token next to each other,
  so no other merge falls between them. A token no merge creates scores below every merge. llama.cpp would also
  join two pieces that make a token without being a merge; converted vocabularies list every such pair as a
  merge (all of Gemma-3's do), and trained ones, where some are not, were not seen to meet them.
  Spaces must become "▁" (a Replace normalizer or a Metaspace pre-tokenizer), and llama.cpp must not need to
  normalize or split anything else. The space prefix is written as add_space_prefix, which llama.cpp puts before
  the text and after every special token, even before a space, as a Prepend normalizer does. A Metaspace one
  (transformers' LlamaTokenizer: Llama 2, Mistral, Phi-3) puts none before a space, nor, with prepend_scheme
  "first", after a special token: it is written with a warning that llama.cpp encodes such text with one "▁"
  more, since refusing it would refuse those families outright.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from gguf import GGUFWriter, Keys, TokenType

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

SPACE = "\u2581"  # SentencePiece's "▁"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


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


def _flat(step: dict | None, key: str) -> list[dict]:
    """A normalizer's (key "normalizers") or pre-tokenizer's ("pretokenizers") steps, Sequences flattened."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step[key] for s in _flat(inner, key)]
    return [step]


def space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json (as a dict) starts text with "▁" (GGUF's add_space_prefix);
    refuses one whose normalizer or pre-tokenizer llama.cpp's "llama" model cannot reproduce."""
    replaced = prepended = False
    for step in _flat(spec.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == SPACE:
            replaced = True
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            prepended = True
        else:
            raise _unwritable(f"its normalizer {_spelled(step)}")
    metaspace = "never"
    for step in _flat(spec.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement") == SPACE and not step.get("split", True):
            replaced = True
            metaspace = step.get("prepend_scheme", "always")
        elif kind == "Split" and replaced and step.get("pattern") == {"String": " "}:
            pass  # no space is left after the normalizer to split at
        else:
            raise _unwritable(f"its pre-tokenizer {_spelled(step)}")
    if not replaced:
        raise _unwritable('it does not write spaces as "▁" (no Replace normalizer or Metaspace pre-tokenizer)')
    if metaspace != "never" and not prepended:
        after = " or follows a special token" if metaspace == "first" else ""
        logging.getLogger(__name__).warning(
            'the tokenizer\'s Metaspace (prepend_scheme "%s") puts no "▁" before text that starts with a space%s, '
            'and llama.cpp does: the GGUF file encodes such text with one "▁" more than transformers',
            metaspace,
            after,
        )
    return prepended or metaspace != "never"


def token_scores(vocab: dict[str, int], merges: list[str | list[str]], size: int) -> list[float]:
    """Scores for llama.cpp's "llama" model that make it join pieces in BPE's merge order: -(first rank of a
    merge that creates the token), and below every merge for a token no merge creates."""
    scores = [-float(len(merges))] * size
    for rank in reversed(range(len(merges))):  # the lowest rank writes last
        left, right = merges[rank].split(" ", 1) if isinstance(merges[rank], str) else merges[rank]
        made = vocab.get(left + right)
        if made is not None:
            scores[made] = -float(rank)
    return scores


def _spelled(step: dict) -> str:
    return json.dumps(step, ensure_ascii=False)


def _unwritable(why: str) -> AutosquashError:
    return AutosquashError(
        f"the tokenizer is SentencePiece-style BPE, but {why}, which llama.cpp cannot reproduce; "
        "export with --format torch"
    )


def add_hf_tokenizer(writer: GGUFWriter, tokenizer: Any) -> None:
    """Write a transformers fast tokenizer (byte-level or SentencePiece-style BPE) as GGUF's tokenizer.* fields."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AutosquashError("GGUF export needs a fast (tokenizer.json) tokenizer; export with --format torch")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    kind = model.get("type")
    byte_level = any(k == "ByteLevel" for k, _ in _steps(spec.get("pre_tokenizer")))
    if kind != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise AutosquashError(
            f"GGUF export writes byte-level BPE and SentencePiece-style BPE (byte fallback) tokenizers; this one is "
            f"{kind}{'' if kind != 'BPE' else ' with neither a ByteLevel pre-tokenizer nor byte fallback'}; "
            "export with --format torch"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens, types = _token_table(vocab, added, size)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
        writer.add_add_space_prefix(False)
    else:
        prefix = _check_sentencepiece(spec, backend)
        for text, i in model["vocab"].items():
            if i not in added and _BYTE_TOKEN.fullmatch(text):
                types[i] = TokenType.BYTE
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None:
            types[unk] = TokenType.UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(token_scores(vocab, model.get("merges", []), size))
        writer.add_token_types([int(t) for t in types])
        writer.add_add_space_prefix(prefix)
    _check_strips(added, tokens, types, _file_name(writer))
    _add_special_tokens(writer, tokenizer)


def _token_table(vocab: dict[str, int], added: dict[int, dict], size: int) -> tuple[list[str], list[TokenType]]:
    """Each id's token string and type: the vocabulary's as normal, added tokens as control (special) or user-defined,
    and a placeholder of type unused for an id neither names."""
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = TokenType.NORMAL
    for i, a in added.items():
        types[i] = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
    return tokens, types


def _add_special_tokens(writer: GGUFWriter, tokenizer: Any) -> None:
    """Write the tokenizer's special token ids, whether its encoding adds BOS and EOS, and its chat template."""
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    # Whether encoding starts with BOS and ends with EOS, as the tokenizer itself does it (a template or a flag).
    ids = tokenizer("a")["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bos is not None and ids[:1] == [bos])
    writer.add_add_eos_token(eos is not None and ids[-1:] == [eos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _check_sentencepiece(spec: dict, backend: Any) -> bool:
    """The space prefix of a SentencePiece-style BPE tokenizer, refused where llama.cpp would encode otherwise."""
    model = spec["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key) not in (None, ""):
            raise _unwritable(f"its BPE model sets {key}={model[key]!r}")
    if model.get("ignore_merges"):
        raise _unwritable("its BPE model takes a whole piece found in the vocabulary before merging (ignore_merges)")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:
        raise _unwritable(f"its vocabulary lacks {len(missing)} of the 256 byte tokens ({missing[0]}, ...)")
    prefix = space_prefix(spec)
    # llama.cpp finds added tokens in the raw text; transformers finds a "normalized" one in the normalized text.
    normalizer = backend.normalizer
    for a in spec.get("added_tokens", []):
        text = a["content"]
        if a.get("normalized") and normalizer is not None:
            if normalizer.normalize_str(text) not in (text, text.replace(" ", SPACE)):
                raise _unwritable(f"its added token {text!r} is matched as {normalizer.normalize_str(text)!r}")
    return prefix


def _file_name(writer: GGUFWriter) -> str:
    value = writer.kv_data[0].get(Keys.General.NAME)
    return str(value.value) if value is not None else ""


def _check_strips(added: dict[int, dict], tokens: list[str], types: list[TokenType], name: str) -> None:
    """Refuse added tokens that strip the whitespace beside them unless llama.cpp strips the same. It reads no
    such flag from the file: it strips the whitespace after the special tokens of a file named like Phi-3, all
    but <unk>, <s> and <|endoftext|>, and after </s> (llama_vocab::impl::load), and nowhere else."""
    name = name.lower()
    stripped: set[int] = set()
    if "phi-3" in name or "phi3" in name:
        ids = {s: i for i, s in enumerate(tokens)}
        absent = [s for s in ("</s>", "<unk>", "<s>", "<|endoftext|>") if s not in ids]
        if absent:
            raise AutosquashError(
                f"llama.cpp cannot load a file named {name!r} whose vocabulary lacks {absent[0]} (it sets Phi-3's "
                "tokens' flags by the file's name); export with --format torch"
            )
        special = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        stripped = {i for i, t in enumerate(types) if t in special} | {ids["</s>"]}
        stripped -= {ids["<unk>"], ids["<s>"], ids["<|endoftext|>"]}
    for i, a in sorted(added.items()):
        if a.get("lstrip") or a.get("single_word"):
            raise AutosquashError(
                f"the tokenizer's added token {a['content']!r} is matched with lstrip or single_word, which llama.cpp "
                "does not do; export with --format torch"
            )
        if bool(a.get("rstrip")) != (i in stripped):
            ours, theirs = ("strips", "keeps") if a.get("rstrip") else ("keeps", "strips")
            raise AutosquashError(
                f"the tokenizer {ours} the whitespace after its added token {a['content']!r} and llama.cpp {theirs} "
                f"it in a file named {name!r} (it strips it only after the special tokens of a file named like "
                "Phi-3); export with --format torch"
            )
