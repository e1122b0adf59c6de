"""A GGUF model file's header is parsed once per process: its architecture, config, weights, tokenizer and price
all read that one parse (issue: the model resolved once)."""

from __future__ import annotations

import json

from autosquash.compress.plan import Plan
from autosquash.cost.model import file_tensors
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats import gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_arch, load_model, load_tokenizer, resolve
from tests.conftest import TINY_SHAPE


def _tiny_gguf(tmp_path):
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({**TINY_SHAPE, "model_type": "llama", "vocab_size": 49152}))
    model = load_model(str(spec), seed=0)
    arch = Arch.from_config(model.config)
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(str(spec), model, arch, Plan.uniform(arch, "Q8_0"), {}))
    return path


def test_every_reader_of_one_file_shares_one_parse(tmp_path, monkeypatch):
    path = _tiny_gguf(tmp_path)
    parses = []
    init = gguf.GGUFFile.__init__

    def counted(self, p, *a, **k):
        parses.append(str(p))
        init(self, p, *a, **k)

    monkeypatch.setattr(gguf.GGUFFile, "__init__", counted)
    gguf._parsed.cache_clear()
    resolve(str(path))
    load_arch(str(path))
    file_tensors(path)
    load_model(str(path))
    load_tokenizer(str(path))
    assert parses == [str(path.resolve())]


def test_a_rewritten_file_is_parsed_again(tmp_path):
    path = _tiny_gguf(tmp_path)
    first = gguf.open_gguf(path)
    assert gguf.open_gguf(path) is first
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # another size: another version of the file
    assert gguf.open_gguf(path) is not first
