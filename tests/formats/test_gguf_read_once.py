"""A GGUF model file's header is parsed once per process: its architecture, config, weights, tokenizer and price
all read that one parse (issue: the model resolved once)."""

from __future__ import annotations

from autosquash.cost.model import file_tensors
from autosquash.formats import gguf
from autosquash.models.load import load_arch, load_model, load_tokenizer, resolve
from tests.conftest import tiny_gguf


def test_every_reader_of_one_file_shares_one_parse(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path)
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
    path = tiny_gguf(tmp_path)
    first = gguf.open_gguf(path)
    assert gguf.open_gguf(path) is first
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # another size: another version of the file
    assert gguf.open_gguf(path) is not first
