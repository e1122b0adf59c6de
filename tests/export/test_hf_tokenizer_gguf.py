"""GGUF export of a Hugging Face model writes its tokenizer.json so that llama.cpp splits and encodes text
exactly as transformers does, for each pre-tokenizer llama.cpp names (Llama 3's, Qwen2's, SmolLM's, GPT-2's).

Offline, one byte-level BPE vocabulary is trained here on text like the test's with no pre-tokenization at
all, so its merges run across digits, punctuation, words and newlines; each pre-tokenizer is put in front of
it in turn. The text has what the pre-tokenizers treat differently (digit runs, contractions in capitals,
punctuation before words and before newlines, indentation, non-Latin script), so a file naming the wrong
one encodes it differently and fails.
"""

from __future__ import annotations

import pytest
import torch

from autosquash.compress.plan import Plan
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import gguf_tokens
from autosquash.formats.hf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT, pre_tokenizer_name
from autosquash.models.arch import Arch
from autosquash.models.load import load_model, load_tokenizer
from tests.conftest import tiny_config

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = (
    "Hello world! It's 12345 apples, DON'T (parens)x=y+1; naïve café\n\n  tabs\tand 3.14159 — 日本語のテキスト"
    " 'quoted' you'LL see\r\nend. def f(x):\n    return {x: [1, 2]}\n\n\nclass A:\n\tpass"
)


def _pre(name: str):
    from tokenizers import Regex, pre_tokenizers

    split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if name in split:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split[name]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


@pytest.fixture(scope="module")
def trained():
    """A byte-level BPE tokenizer trained without pre-tokenization (merges across every boundary) and a tiny
    Llama of its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TEXT, TEXT.upper(), TEXT.lower(), " ".join(str(n) for n in range(1000, 1400)), *TEXT.split()] * 20
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2)).eval()
    return tok, model


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt-2"])
def test_llama_cpp_encodes_as_transformers_with_the_written_tokenizer(trained, tmp_path, pre):
    tok, model = trained
    folder = tmp_path / pre
    tok.backend_tokenizer.pre_tokenizer = _pre(pre)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    spec = str(folder)
    hf = load_tokenizer(spec)  # as the export reads it back
    import json

    assert pre_tokenizer_name(json.loads(hf.backend_tokenizer.to_str())) == pre
    path = folder / "m.gguf"
    base = load_model(spec)
    arch = Arch.from_config(base.config)
    write_gguf(path, BuiltModel(spec, base, arch, Plan.uniform(arch, "F16"), {}))
    assert gguf_tokens(path) == hf.convert_ids_to_tokens(list(range(len(hf))))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert theirs == hf(TEXT, add_special_tokens=False)["input_ids"]


def test_an_unknown_pre_tokenizer_is_refused():
    with pytest.raises(AutosquashError, match="Whitespace.*--format torch"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
