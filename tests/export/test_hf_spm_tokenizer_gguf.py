"""GGUF export of a Hugging Face model writes a SentencePiece-style tokenizer.json (BPE over "▁"-spelled text with
<0xNN> byte fallback) as llama.cpp's "llama" model, whose scores make it join pieces in the merges' order, so that
llama.cpp encodes text exactly as transformers does.

Offline, one such BPE vocabulary is trained here on Python's own sources (textwrap's and argparse's: English,
code, indentation, digits), with no pre-tokenization, so its merges run across spaces; it has no accented or
CJK characters, which fall back to bytes. It is written with Llama 2's space prefix (a Prepend normalizer) and
with Gemma's none, and encodes the test's text and a source it was not trained on (json.decoder's) as
transformers does; with every score equal, llama.cpp would join pieces leftmost first and encode most lines of
that source otherwise. The real Gemma-3 tokenizer (262k tokens, its merges rebuilt by transformers from the GGUF
asset) is the integration test.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import json.decoder
import logging
import textwrap

import pytest
import torch

from autosquash.compress.plan import Plan
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import gguf_tokens
from autosquash.formats.hf_vocab import add_hf_tokenizer, token_scores
from autosquash.models.arch import Arch
from autosquash.models.assets import asset_path
from autosquash.models.load import load_model, load_tokenizer
from tests.conftest import TINY_SHAPE, tiny_config

llama_cpp = pytest.importorskip("llama_cpp")

SPECIALS = ["<unk>", "<s>", "</s>"]
USER_TOKEN = "<|tool|>"  # an added token that is not special: llama.cpp's user-defined
TEXT = (
    "  Hello world!  It's 12345 apples, DON'T (parens)x=y+1; naïve café\n\n  tabs\tand 3.14159 — 日本語のテキスト"
    "   'quoted' <s>you'LL see</s>\r\nend.<|tool|> def f(x):\n    return {x: [1, 2]}\n\n\nclass A:\n\tpass  "
)


def _encode(path, text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


@functools.cache
def _learned(prefix: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a BPE trained without pre-tokenization, in SentencePiece's layout: <unk> <s> </s>,
    the 256 byte tokens, then the learned pieces; spaces as "▁", prefixed (Llama 2) or not (Gemma)."""
    from tokenizers import Tokenizer, models, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = _spaces(prefix)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False)
    bpe.train_from_iterator("".join(inspect.getsource(m) for m in (textwrap, argparse)).split("\n\n"), trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]


def _spaces(prefix: bool):
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])


def _sentencepiece_bpe(prefix: bool, phi3: bool = False):
    """The trained BPE as a transformers tokenizer with byte fallback, its special tokens and a user-defined one;
    `phi3` adds Phi-3's <|endoftext|> and <|user|>, and all but <unk>, <s> and <|endoftext|> strip the whitespace
    after them, as Phi-3's do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _learned(prefix)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = _spaces(prefix)
    specials = SPECIALS + ["<|endoftext|>", "<|user|>"] * phi3
    stripped = ("</s>", "<|user|>") if phi3 else ()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in stripped) for t in specials])
    tok.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False, rstrip=phi3)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    strip = [decoders.Strip(" ", 1, 0)] * prefix
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _export(tok, folder, config=None):
    """`tok` in front of a tiny random model (a Llama unless `config` says) saved in `folder`, written as GGUF:
    (the tokenizer as the export reads it back, the file)."""
    from transformers import AutoModelForCausalLM

    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = config or tiny_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    spec = str(folder)
    hf = load_tokenizer(spec)
    path = folder / "m.gguf"
    base = load_model(spec)
    arch = Arch.from_config(base.config)
    write_gguf(path, BuiltModel(spec, base, arch, Plan.uniform(arch, "F16"), {}))
    return hf, path


@pytest.mark.parametrize("style", ["llama2", "gemma"])
def test_llama_cpp_encodes_as_transformers_with_the_written_sentencepiece_tokenizer(tmp_path, style):
    tok = _sentencepiece_bpe(prefix=style == "llama2")
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    hf, path = _export(tok, tmp_path / style)
    ours = hf(TEXT, add_special_tokens=False)["input_ids"]
    assert {f"<0x{b:02X}>" for b in "ï日".encode()} <= set(hf.convert_ids_to_tokens(ours))  # bytes were needed
    assert gguf_tokens(path) == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert _encode(path, TEXT) == ours
    unseen = inspect.getsource(json.decoder)
    assert _encode(path, unseen) == hf(unseen, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:  # BOS as the tokenizer adds it; bytes decoded back (llama-cpp-python keeps the prefix's space)
        assert llm.tokenize(b"Hi", add_bos=True, special=True) == hf("Hi")["input_ids"]
        assert llm.metadata["tokenizer.chat_template"] == hf.chat_template
        prefix = " " * (style == "llama2")
        assert llm.detokenize(ours).decode() == prefix + hf.decode(ours, skip_special_tokens=True)
    finally:
        llm.close()


def test_a_metaspace_prefix_is_written_with_a_warning_that_llama_cpp_adds_it_before_a_space(tmp_path, caplog):
    from transformers import LlamaTokenizer

    vocab, merges = _learned(prefix=True)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False)  # transformers' Llama 2: prepend_scheme "first"
    with caplog.at_level(logging.WARNING, logger="autosquash.formats.hf_vocab"):
        hf, path = _export(tok, tmp_path / "metaspace")
    assert "starts with a space or follows a special token, and llama.cpp does" in caplog.text
    text = "Hello world!\n  def f(x):\n\treturn 3.14"
    assert _encode(path, text) == hf(text, add_special_tokens=False)["input_ids"]
    spaced = hf(" " + text, add_special_tokens=False)["input_ids"]
    assert _encode(path, " " + text)[:1] == hf.convert_tokens_to_ids(["▁▁"]) != spaced[:1]  # as the warning says


@pytest.mark.parametrize("name", ["phi3", "llama"])
def test_whitespace_stripped_after_special_tokens_is_written_only_where_llama_cpp_strips_it(tmp_path, name):
    tok = _sentencepiece_bpe(prefix=True, phi3=True)
    if name != "phi3":  # llama.cpp strips only in files named like Phi-3
        with pytest.raises(
            AutosquashError, match="strips the whitespace after its added token '</s>' and llama.cpp keeps it"
        ) as e:
            _export(tok, tmp_path / name)
        assert "\n" not in str(e.value)
        return
    hf, path = _export(tok, tmp_path / name)
    text = "<|user|>\n  Hi there</s>\n ok<|endoftext|> end <s> x<|tool|>\t y"
    assert _encode(path, text) == hf(text, add_special_tokens=False)["input_ids"]


def test_scores_follow_the_first_merge_that_creates_a_token():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5, "z": 6}
    merges = [["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"]]
    assert token_scores(vocab, merges, 8) == [-4.0, -4.0, -4.0, 0.0, -1.0, -2.0, -4.0, -4.0]


def _refusal(tok, tmp_path) -> str:
    from gguf import GGUFWriter

    with pytest.raises(AutosquashError) as e:
        add_hf_tokenizer(GGUFWriter(str(tmp_path / "x.gguf"), "llama"), tok)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("part", "step", "said"),
    [
        ("normalizer", "NFKC", 'its normalizer {"type": "NFKC"}'),
        ("normalizer", None, 'it does not write spaces as "▁"'),
        ("pre_tokenizer", "Whitespace", 'its pre-tokenizer {"type": "Whitespace"}'),
    ],
)
def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused_in_one_line(tmp_path, part, step, said):
    from tokenizers import normalizers, pre_tokenizers

    tok = _sentencepiece_bpe(prefix=False)
    steps = normalizers if part == "normalizer" else pre_tokenizers
    setattr(tok.backend_tokenizer, part, step and getattr(steps, step)())
    why = _refusal(tok, tmp_path)
    assert why.startswith("the tokenizer is SentencePiece-style BPE, but ") and said in why
    assert why.endswith("which llama.cpp cannot reproduce; export with --format torch")


def test_a_unigram_tokenizer_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)))
    assert _refusal(tok, tmp_path).endswith("this one is Unigram; export with --format torch")


@pytest.mark.integration
def test_llama_cpp_encodes_as_transformers_with_gemma3s_tokenizer(tmp_path):
    from transformers import AutoTokenizer, Gemma3TextConfig

    asset = asset_path("gemma-3-270m")
    if asset is None:
        pytest.skip("the gemma-3-270m asset is not fetched (autosquash fetch gemma-3-270m)")
    tok = AutoTokenizer.from_pretrained(str(asset.parent), gguf_file=asset.name)
    narrow = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "query_pre_attn_scalar": 64}
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    hf, path = _export(
        tok, tmp_path / "gemma3", Gemma3TextConfig(**{**TINY_SHAPE, **narrow, **ids, "vocab_size": len(tok)})
    )
    text = TEXT.replace("<s>", "<start_of_turn>").replace("</s>", "<end_of_turn>").replace(USER_TOKEN, "<table>")
    ours = hf(text, add_special_tokens=False)["input_ids"]
    assert ours == tok(text, add_special_tokens=False)["input_ids"]
    assert _encode(path, text) == ours
    unseen = inspect.getsource(json.decoder)
    assert _encode(path, unseen) == hf(unseen, add_special_tokens=False)["input_ids"]
