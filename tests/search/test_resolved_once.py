"""A search or an export resolves its model spec once, where it starts, and parses its GGUF file's header once:
the resolved model is handed down to what loads the weights, the tokenizer and the statistics, prices the file
and writes the export's tokenizer."""

import sys

import pytest

from autosquash.cli import main
from autosquash.formats import gguf
from autosquash.models import load
from tests.conftest import SMALL_SPACE, tiny_gguf, write_experiment


@pytest.fixture
def gguf_file(tmp_path):
    return tiny_gguf(tmp_path)


@pytest.fixture
def counted(gguf_file, monkeypatch) -> tuple[list, list]:
    """(specs resolved, GGUF files parsed), as this process does them once the file is written."""
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
    return resolved, parses


@pytest.mark.integration
def test_a_search_resolves_its_model_once_and_parses_its_header_once(tmp_path, gguf_file, counted):
    path = gguf_file
    exp = write_experiment(tmp_path, str(path), SMALL_SPACE, trials=2)
    assert main(["search", str(exp), "--out", str(tmp_path / "run")]) == 0
    assert counted[0] == [str(path)]
    assert counted[1].count(str(path.resolve())) == 1


def test_an_export_resolves_its_model_once_and_parses_its_header_once(tmp_path, gguf_file, counted):
    path = gguf_file
    assert main(["export", "--model", str(path), "--uniform", "Q4_0", "--out", str(tmp_path / "out.gguf")]) == 0
    assert counted[0] == [str(path)]
    assert counted[1].count(str(path.resolve())) == 1
