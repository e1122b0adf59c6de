"""Qwen2's q/k/v biases survive compression and export: llama.cpp runs the GGUF file with them, as its own
`qwen2` architecture unpruned and as `deci` (the llama graph, which adds q/k/v biases) with per-layer shapes.

A tiny random Qwen2 with SmolLM2's vocabulary (whose tokenizer the file copies) and biases large enough to
move every logit; llama.cpp's logits must match autosquash's far more closely than the same model's
without its biases does, so a file that dropped them, or kept q/k's in the wrong row order, fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autosquash.compress.apply import compress
from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import gguf_arch, write_gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_model, read_gguf_model
from tests.conftest import TINY_SHAPE
from tests.export.conftest import llama_cpp_logits

llama_cpp = pytest.importorskip("llama_cpp")

UNIFORM = "uniform"
PRUNED = Plan(
    groups={
        "blk.0.attn": LayerChoice(quant="F16", attn_keep_ratio=0.5),
        "blk.0.ffn": LayerChoice(quant="F16", ffn_keep_ratio=0.75),
        "blk.1.attn": LayerChoice(quant="F16"),
        "blk.1.ffn": LayerChoice(quant="F16"),
    },
    embed_quant="F16",
)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    spec = folder / "config.json"
    config = {**TINY_SHAPE, "model_type": "qwen2", "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}
    spec.write_text(json.dumps(config))
    model = load_model(str(spec), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(len(name)))
    return str(spec), model, Arch.from_config(model.config)


def test_qwen2_prices_its_biases(qwen2):
    _, model, arch = qwen2
    assert arch.biased == ("attn_q", "attn_k", "attn_v")
    priced = deployed_tensors(arch, Plan.uniform(arch, "F16"))
    assert sum(int(np.prod(t.shape)) for t in priced) == sum(p.numel() for p in model.parameters())
    pruned = {t.name: t.shape for t in deployed_tensors(arch, PRUNED)}
    assert pruned["blk.0.attn_k.bias"] == (arch.head_dim,)  # one of two KV heads kept: its bias rows only


@pytest.mark.parametrize("plan", [UNIFORM, PRUNED], ids=["qwen2", "deci"])
def test_llama_cpp_runs_the_exported_qwen2_with_its_biases(qwen2, tmp_path, plan):
    spec, model, arch = qwen2
    plan = Plan.uniform(arch, "F16") if plan == UNIFORM else plan
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(spec, model, arch, plan, {}))
    ids = torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        compressed = compress(model, arch, plan, {})
        ours = compressed(torch.tensor([ids])).logits[0].double().numpy()
        for m in compressed.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        unbiased = compressed(torch.tensor([ids])).logits[0].double().numpy()
    theirs = llama_cpp_logits(path, ids)
    assert gguf_arch(arch, plan) == ("qwen2" if plan.groups.get("blk.0.attn").attn_keep_ratio == 1 else "deci")
    gap, effect = np.abs(theirs - ours).max(), np.abs(unbiased - ours).max()
    # F16 weights and llama.cpp's F16 rounding of activations: about 1e-2 here; the biases move logits by ~1.
    assert gap < 0.05 * effect, f"llama.cpp differs by {gap:.4f}; the biases move logits by {effect:.4f}"
    # autosquash reads the file back to the same model (eval --model on a GGUF).
    with torch.no_grad():
        back = read_gguf_model(path)(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(back - ours).max() < 1e-2
