"""The base model's trip to the workers: out-of-band arrays (no copy), the same model on arrival."""

import pickle

import numpy as np
import torch
from transformers import LlamaForCausalLM

from autosquash.models.ship import Shipped
from tests.conftest import tiny_config


def _roundtrip(model):
    buffers = []
    data = pickle.dumps(Shipped(model), protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers), data, buffers


def test_the_weights_travel_out_of_band_and_arrive_in_place():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    got, data, buffers = _roundtrip(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(data) < weights / 20  # the pickle itself is the skeleton; the weights are buffers
    assert sum(memoryview(b).nbytes for b in buffers) >= weights
    # The received tensors are views of the buffers (what Ray's object store maps), not copies of them.
    starts = {np.frombuffer(b, dtype=np.uint8).ctypes.data for b in buffers}
    assert got.model.layers[1].mlp.down_proj.weight.data_ptr() in starts
    assert got.model.embed_tokens.weight.data_ptr() in starts
    assert got.lm_head.weight is got.model.embed_tokens.weight  # tied stays tied
    for (k, a), (k2, b) in zip(model.state_dict().items(), got.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, got(ids).logits)
    assert {n for n, p in got.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters()}


def test_bfloat16_and_frozen_weights_survive():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
    model.model.norm.weight.requires_grad_(False)
    got, _, _ = _roundtrip(model)
    assert got.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(got.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert not got.model.norm.weight.requires_grad
    assert torch.equal(got.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)  # buffers too
