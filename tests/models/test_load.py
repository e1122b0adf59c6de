import json
import os
from pathlib import Path

import pytest

from autosquash.errors import AutosquashError
from autosquash.models.load import load_arch, load_model, resolve


def test_specs_are_classified(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)).kind == "folder"
    assert resolve(str(tmp_path / "config.json")).kind == "config"
    assert resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(AutosquashError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))


def test_config_json_gives_a_seeded_random_model(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 100,
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    a, b = load_model(str(tmp_path / "c.json"), seed=3), load_model(str(tmp_path / "c.json"), seed=3)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert load_arch(str(tmp_path / "c.json")).head_dim == 32


def test_bad_config_value_is_one_error(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama", "initializer_range": 5e4}))
    with pytest.raises(AutosquashError, match="initializer_range"):
        load_model(str(tmp_path / "c.json"))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(AutosquashError, match="gpt2"):
        load_arch(str(tmp_path / "c.json"))


def test_torch_format_files_are_their_own_kind(tmp_path, tiny_model, tiny_arch):
    from autosquash.compress.plan import Plan
    from autosquash.export.build import BuiltModel
    from autosquash.export.torch_file import save

    plan = Plan.uniform(tiny_arch, "Q8_0")
    spec = str(tmp_path / "base.json")
    save(tmp_path / "m.safetensors", BuiltModel(spec, tiny_model, tiny_arch, plan, {}))
    src = resolve(str(tmp_path / "m.safetensors"))
    assert src.kind == "torch" and src.key.startswith("torch:")
    assert load_arch(str(tmp_path / "m.safetensors")) == tiny_arch  # from the base config it records


def _small_vocab_model(folder: Path) -> str:
    """A tiny Llama with a 300-token byte-level BPE vocabulary, saved as a model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import tiny_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["Hello world, the cat sat on the mat. 12345 apples."] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(vocab_size=len(tok), bos_token_id=0, eos_token_id=1)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_gguf_tokenizer_is_converted_once_and_its_model_read_by_autosquash(tmp_path, monkeypatch, caplog):
    """transformers converts a GGUF file's tokenizer (seconds on a real vocabulary) once, kept in the cache; the
    config and weights are autosquash's own reads of the file (its header, its tensors), not transformers'."""
    import torch

    from autosquash.compress.plan import Plan
    from autosquash.export.build import BuiltModel
    from autosquash.export.gguf_file import write_gguf
    from autosquash.models import load
    from autosquash.models.arch import Arch

    spec = _small_vocab_model(tmp_path / "hf")
    base = load_model(spec)
    arch = Arch.from_config(base.config)
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(spec, base, arch, Plan.uniform(arch, "F16"), {}))
    monkeypatch.setenv("AUTOSQUASH_CACHE_DIR", str(tmp_path / "cache"))

    def no_transformers_gguf(*a, **k):
        raise AssertionError("transformers read the GGUF file's weights or config")

    with monkeypatch.context() as m:
        m.setattr("transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint", no_transformers_gguf)
        config, model = load.load_config(resolve(str(path))), load_model(str(path))
    first = (config, load.load_tokenizer(str(path)), model)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").glob("*/*")) == ["tokenizer"]

    def no_gguf_tokenizer(*a, **k):
        raise AssertionError("converted the GGUF file's tokenizer again")

    monkeypatch.setattr("transformers.integrations.gguf.get_gguf_tokenizer", no_gguf_tokenizer)
    again = (load.load_config(resolve(str(path))), load.load_tokenizer(str(path)), load_model(str(path)))

    def fields(config):
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}

    assert fields(again[0]) == fields(first[0])
    text = "Hello world! It's 12345 apples, naïve café\n\n</s>"
    assert again[1](text)["input_ids"] == first[1](text)["input_ids"]
    assert (again[1].eos_token, again[1].bos_token, again[1].pad_token) == (
        first[1].eos_token,
        first[1].bos_token,
        first[1].pad_token,
    )
    for (n, p), (m, q) in zip(first[2].state_dict().items(), again[2].state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q)
    with torch.no_grad():  # the weights the file holds: F16 of the base model's
        assert torch.equal(again[2].lm_head.weight, base.lm_head.weight.half().float())

    monkeypatch.undo()  # a changed file's tokenizer is converted again, into its own copy
    monkeypatch.setenv("AUTOSQUASH_CACHE_DIR", str(tmp_path / "cache"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2 * 10**9))
    load.load_tokenizer(str(path))
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2

    # A cache that cannot be written only costs time: the tokenizer still loads, with a warning.
    monkeypatch.setenv("AUTOSQUASH_CACHE_DIR", str(path))  # a file, not a folder
    with caplog.at_level("WARNING"):
        assert load.load_tokenizer(str(path))(text)["input_ids"] == first[1](text)["input_ids"]
    assert "could not keep the converted tokenizer" in caplog.text
