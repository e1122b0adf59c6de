"""KV-group importance: the score the attention pruning ranks KV groups by."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import keep_channels
from autosquash.compress.operators.kv_prune import kv_group_importance


def test_kv_group_importance_sums_the_channels_of_each_group(tiny_model):
    cfg = tiny_model.config
    o_weight = tiny_model.model.layers[0].self_attn.o_proj.weight.detach()
    g = torch.Generator().manual_seed(0)
    o_input_sq = torch.rand(o_weight.shape[1], generator=g)
    score = kv_group_importance(o_weight, o_input_sq, cfg.num_key_value_heads)
    assert score.shape == (cfg.num_key_value_heads,)
    # Query heads h*g .. h*g+g-1 share KV head h (Llama's GQA), so a group's channels are contiguous.
    per_channel = o_weight.norm(dim=0) * o_input_sq.sqrt()
    width = cfg.num_attention_heads // cfg.num_key_value_heads * cfg.head_dim
    expected = torch.stack([per_channel[k * width : (k + 1) * width].sum() for k in range(cfg.num_key_value_heads)])
    torch.testing.assert_close(score, expected)  # float32 sums of 128 terms in another order: default rtol 1.3e-6


def test_the_kv_group_with_the_stronger_inputs_ranks_first(tiny_model):
    cfg = tiny_model.config
    o_weight = tiny_model.model.layers[0].self_attn.o_proj.weight.detach()
    width = o_weight.shape[1] // cfg.num_key_value_heads
    o_input_sq = torch.ones(o_weight.shape[1])
    o_input_sq[width : 2 * width] = 100.0  # group 1's heads carry 10x the RMS activation
    score = kv_group_importance(o_weight, o_input_sq, cfg.num_key_value_heads)
    assert keep_channels(score, 1).tolist() == [1]
