"""A search resolves its model spec once, in its preflight, and parses its GGUF file's header once: the resolved
model is handed down to what loads the weights, the tokenizer and the statistics, and prices the file."""

import sys

import pytest

from autosquash.cli import main
from autosquash.formats import gguf
from autosquash.models import load
from tests.conftest import tiny_gguf, write_experiment

pytestmark = pytest.mark.integration

SPACE = {
    "name": "once",
    "target": "gguf",
    "attn": {"quant": ["Q8_0", "Q4_0"]},
    "ffn": {"quant": ["Q8_0", "Q4_0"]},
    "baselines": ["Q8_0"],
}


def test_a_search_resolves_its_model_once_and_parses_its_header_once(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path)
    resolved, parses = [], []
    resolve, init = load.resolve, gguf.GGUFFile.__init__

    def counted_resolve(spec):
        resolved.append(spec)
        return resolve(spec)

    def counted_parse(self, p, *a, **k):
        parses.append(str(p))
        init(self, p, *a, **k)

    for module in [m for name, m in sys.modules.items() if name.startswith("autosquash")]:
        if getattr(module, "resolve", None) is resolve:  # every module that took the name, not only load's
            monkeypatch.setattr(module, "resolve", counted_resolve)
    monkeypatch.setattr(gguf.GGUFFile, "__init__", counted_parse)
    gguf._parsed.cache_clear()
    exp = write_experiment(tmp_path, str(path), SPACE, trials=2)
    assert main(["search", str(exp), "--out", str(tmp_path / "run")]) == 0
    assert resolved == [str(path)]
    assert parses.count(str(path.resolve())) == 1
