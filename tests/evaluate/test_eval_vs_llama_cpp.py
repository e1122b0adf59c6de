"""`autosquash eval --text FILE` reads a user's file as llama.cpp does and, with llama-perplexity's convention
(`--score second-half`), gives its perplexity: the real SmolLM2, through llama.cpp's engine (llama-cpp-python)."""

from __future__ import annotations

import json
import math
import os

import llama_cpp
import numpy as np
import pytest

from autosquash.cli import main
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.models.load import _shipped_path, load_tokenizer

pytestmark = pytest.mark.integration
SEQ, TOKENS = 512, 2048
# Our float32 forward pass of the Q4_1 weights against llama.cpp's Q4_1 kernels (activations rounded to 8
# bits for the dot products) and F16 KV cache: the bound, 1 %.
TOLERANCE = 0.01


def test_eval_on_a_text_file_agrees_with_llama_cpp(tmp_path, capsys):
    text = "\n\n".join(load_texts("wikipedia")[:60])  # a plain English text file of a few thousand tokens
    f = tmp_path / "article.txt"
    f.write_text(text, encoding="utf-8")
    args = ["eval", "--model", "smollm2-135m", "--text", str(f), "--tokens", str(TOKENS), "--seq-len", str(SEQ)]
    assert main([*args, "--score", "second-half", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["scored"] == (TOKENS // SEQ) * (SEQ // 2 - 1)  # as llama-perplexity counts them

    llm = llama_cpp.Llama(
        model_path=os.path.join(*_shipped_path("smollm2-135m")), n_ctx=SEQ, logits_all=True, verbose=False
    )
    try:
        # The same token stream: llama.cpp's tokenizer reads the file as ours does (SmolLM2 adds no BOS).
        stream = llm.tokenize(text.encode(), add_bos=False, special=False)
        batch = token_block(load_tokenizer("smollm2-135m"), (text,), TOKENS, SEQ)
        assert stream[:TOKENS] == batch.reshape(-1).tolist()
        nll = []
        for row in batch.tolist():
            llm.reset()
            llm.eval(row)
            logits = llm.scores[:SEQ].astype(np.float64)
            top = logits.max(-1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
            first = SEQ // 2  # llama-perplexity: logits from the window's middle on predict the next token
            nll.append(log_z[first : SEQ - 1] - logits[np.arange(first, SEQ - 1), row[first + 1 :]])
    finally:
        llm.close()
    theirs = math.exp(np.concatenate(nll).mean())
    assert abs(ours["perplexity"] / theirs - 1) < TOLERANCE, (ours["perplexity"], theirs)
    # Scoring every position (the default) reads higher: early positions have little context.
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > ours["perplexity"]
