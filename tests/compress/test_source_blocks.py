"""A GGUF base model's tensors kept as the file holds them wherever a plan asks their own type: no re-quantizing
(which a K-quant need not survive exactly), so the plan's weights are the base model's, bit for bit, and its
export holds the file's own blocks (as llama-quantize leaves a tensor already in its target type)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autosquash.compress.apply import VariantCache, compress, quantized_tensors
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import open_gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_model
from tests.conftest import TINY_SHAPE


def _file(tmp_path, model_type: str, quant: str):
    """A tiny random model of `model_type` written as a uniform `quant` GGUF file, and that file read back."""
    cfg = {
        **TINY_SHAPE,
        "model_type": model_type,
        "vocab_size": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if model_type.startswith("gemma"):
        cfg["query_pre_attn_scalar"] = TINY_SHAPE["head_dim"]
    if model_type == "qwen2":
        cfg["tie_word_embeddings"] = False
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps(cfg))
    model = load_model(str(spec), seed=0)
    arch = Arch.from_config(model.config)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(path, BuiltModel(str(spec), model, arch, Plan.uniform(arch, quant), {}))
    return path, load_model(str(path))


def _quantized(path) -> dict[str, tuple[str, bytes]]:
    return {
        t.name: (t.tensor_type.name, np.ascontiguousarray(t.data).tobytes())
        for t in open_gguf(path).tensors
        if t.tensor_type.name not in ("F32", "F16")
    }


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gemma3_text"])
def test_a_plan_in_the_files_own_type_keeps_its_blocks_and_weights_exactly(tmp_path, model_type):
    """llama's q/k rows are permuted in the file, phi3's q/k/v and gate/up fused: the blocks go through the
    same row moves as the decoded weights, so the export is the file's bytes again."""
    path, base = _file(tmp_path, model_type, "Q4_K")
    arch = Arch.from_config(base.config)
    plan = Plan.uniform(arch, "Q4_K")
    model = compress(base, arch, plan, {})
    for (name, p), q in zip(base.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name
    again = tmp_path / "again.gguf"
    write_gguf(again, BuiltModel(str(path), base, arch, plan, {}))
    assert _quantized(again) == _quantized(path)


def test_another_type_or_pruned_rows_are_quantized_from_the_weights(tmp_path):
    path, base = _file(tmp_path, "llama", "Q4_K")
    arch = Arch.from_config(base.config)
    cache = VariantCache(max_bytes=1 << 30)
    variants = {name: v for name, _, v in quantized_tensors(base, arch, Plan.uniform(arch, "Q8_0"), {}, cache)}
    assert {v.parts["weight"].type for v in variants.values()} == {"Q8_0"}
    pruned = Plan.uniform(arch, "Q4_K")
    pruned.groups["blk.0.ffn"] = LayerChoice(quant="Q4_K", ffn_keep_ratio=0.5)
    model = compress(base, arch, pruned, {})
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == arch.intermediate_size // 2
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)


def test_a_model_that_is_not_read_from_gguf_has_no_source_blocks(tiny_model):
    assert not any(hasattr(m, "gguf_source") for m in tiny_model.modules())
