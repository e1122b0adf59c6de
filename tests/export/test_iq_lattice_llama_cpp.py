"""llama.cpp runs GGUF files holding autosquash's lattice tensors (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS) as
autosquash decodes them: the tiny random Llama with every type in some matrix, exported with importance statistics,
gives llama.cpp's logits far closer to autosquash's (which multiply by our decoded weights) than either is to the
float model's, so bytes llama.cpp read differently from us (an index's high bits, a sign code) fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import open_gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_model
from tests.export.conftest import llama_cpp_logits

llama_cpp = pytest.importorskip("llama_cpp")

TINY = str(Path(__file__).parents[2] / "experiments/tiny-llama.json")


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_iq4_llama_cpp.py: contended threads slow the codecs' mid-sized ops
    try:
        base = load_model(TINY, seed=0)
        batch = torch.randint(3, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
        yield base, Arch.from_config(base.config), collect_stats(base, batch)
    finally:
        torch.set_num_threads(threads)


def test_llama_cpp_runs_lattice_tensors_as_autosquash_decodes_them(tiny, tmp_path):
    base, arch, stats = tiny
    plan = Plan(
        embed_quant="IQ3_S",
        groups={
            "blk.0.attn": LayerChoice(quant="IQ3_S", tensor_quant={"attn_v": "IQ3_XXS"}),
            "blk.0.ffn": LayerChoice(quant="IQ2_S", tensor_quant={"ffn_down": "IQ2_XXS"}),
            "blk.1.attn": LayerChoice(quant="IQ2_XS"),
            "blk.1.ffn": LayerChoice(quant="IQ3_XXS", tensor_quant={"ffn_up": "IQ2_S"}),
        },
    )
    path = tmp_path / "m.gguf"
    cache = VariantCache(max_bytes=1 << 62)  # the file's tensors are the ones scored below, quantized once
    write_gguf(path, TINY, base, arch, plan, stats, cache)
    types = {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
    assert types["token_embd.weight"] == "IQ3_S" and types["blk.0.attn_v.weight"] == "IQ3_XXS"
    assert types["blk.0.ffn_down.weight"] == "IQ2_XXS" and types["blk.1.attn_q.weight"] == "IQ2_XS"
    assert types["blk.1.ffn_up.weight"] == "IQ2_S"
    ids = torch.randint(3, arch.vocab_size, (32,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ours = compress(base, arch, plan, stats, cache)(torch.tensor([ids])).logits[0].double().numpy()
        exact = base(torch.tensor([ids])).logits[0].double().numpy()
    theirs = llama_cpp_logits(path, ids)
    gap, effect = np.abs(theirs - ours).max(), np.abs(exact - ours).max()
    # Measured gap 0.021 (llama.cpp multiplies these types against activations in Q8_K blocks) against 0.77 for
    # quantization; the IQ4 types' test, where misread nibbles left gaps of 1.4-2.5, holds the same bound.
    assert gap < 0.15 * effect, f"llama.cpp differs by {gap:.5f}; quantization moves logits by {effect:.5f}"
