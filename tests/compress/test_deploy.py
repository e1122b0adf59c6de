"""One answer to "what does this linear deploy": the cache key, apply and the cost model agree on it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from autosquash.compress.apply import VariantCache, compress, quantized_tensors
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.operators import deploy_linear
from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.formats.codecs import QuantizedTensor
from autosquash.models.arch import Arch
from tests.conftest import tiny_config

# Rows that hold no K-quant (Q2_K falls back to IQ4_NL) with factors whose rows do, as on SmolLM2's 576-wide
# rows: a Kronecker factor of a 512x192 linear has 16·16 = 256-value rows; an SVD factor of rank 256 of a
# 1536x320 linear has 256-value rows. Small widths keep the Kronecker permutation search fast.
MODELS = {
    "kron": dict(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1),
    "svd": dict(hidden_size=320, intermediate_size=1536, num_attention_heads=5, num_key_value_heads=1),
}
CHOICES = {"kron": {"kron_rank": 2}, "svd": {"rank_ratio": 0.8}}


def _smol(kind: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=1, **MODELS[kind])).eval()
    batch = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, Arch.from_config(model.config), collect_stats(model, batch), batch


def _plan(kind: str, quant: str) -> Plan:
    return Plan(target="torch", groups={"blk.0.ffn": LayerChoice(quant=quant, **CHOICES[kind])})


def test_on_smollm2_576_wide_rows_factors_take_q2_k_where_the_weight_cannot():
    """SmolLM2's shapes (no compute): the case the cache once got wrong."""
    q2 = LayerChoice(quant="Q2_K")
    assert deploy_linear("blk.0.ffn_up", 1536, 576, q2).type_of("weight") == "IQ4_NL"  # llama.cpp's fallback
    kron = deploy_linear("blk.0.ffn_up", 1536, 576, LayerChoice(quant="Q2_K", kron_rank=4))
    assert kron.type_of("kron_a") == "Q2_K"  # 32 x 24 = 768-value rows
    svd = deploy_linear("blk.0.attn_q", 576, 576, LayerChoice(quant="Q2_K", rank_ratio=0.45))
    assert svd.size == 256 and svd.type_of("lr_b") == "Q2_K" and svd.type_of("lr_a") == "IQ4_NL"
    q4 = deploy_linear("blk.0.ffn_up", 1536, 576, LayerChoice(quant="Q4_0", kron_rank=4))
    assert q4.key != kron.key


def test_factor_rows_take_types_that_the_weights_rows_cannot():
    kron = deploy_linear("blk.0.ffn_up", 1536, 576, LayerChoice(quant="Q2_K", kron_rank=4))
    assert (
        kron.type_of("kron_a") == "Q2_K"
        and deploy_linear("blk.0.ffn_up", 1536, 576, LayerChoice(quant="Q2_K")).type_of("weight") == "IQ4_NL"
    )
    svd = deploy_linear("blk.0.attn_q", 576, 576, LayerChoice(quant="Q2_K", rank_ratio=0.45))
    assert svd.size == 256 and svd.type_of("lr_b") == "Q2_K" and svd.type_of("lr_a") == "IQ4_NL"


@pytest.mark.parametrize("kind", ["kron", "svd"])
def test_q2_k_and_q4_0_factors_are_separate_cache_entries_scored_as_priced(kind):
    model, arch, stats, batch = _smol(kind)
    cache = VariantCache()
    built = {}
    for quant in ("Q4_0", "Q2_K"):  # Q4_0 first: a key by W's own row type would hand Q2_K its factors
        plan = _plan(kind, quant)
        built[quant] = compress(model, arch, plan, stats, cache)
        priced = {t.name: t.type for t in deployed_tensors(arch, plan)}
        for name, _, variant in quantized_tensors(model, arch, plan, stats, cache):
            for suffix, part in variant.parts.items():
                if isinstance(part, QuantizedTensor):
                    full = f"{name}.{suffix}"
                    assert part.type == priced[full], (full, part.type, priced[full])
    with torch.no_grad():
        fresh = compress(model, arch, _plan(kind, "Q2_K"), stats)  # no cache at all
        # Bitwise: the cached Q2_K model is the one built from scratch, not the Q4_0 one.
        assert torch.equal(built["Q2_K"](batch).logits, fresh(batch).logits)
        assert not torch.equal(built["Q2_K"](batch).logits, built["Q4_0"](batch).logits)
