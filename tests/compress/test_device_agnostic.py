"""Codecs, decompositions and pruning run on the device the weights sit on (a GPU worker's own), and keep
what they make in host memory.

CI has no GPU, so two checks stand in for one: every test runs on each device torch sees (CUDA too, where
present), and the CPU runs happen under `torch.device("meta")` as the default device, so a tensor made
without naming its device lands on meta and the first arithmetic with a real tensor fails. A CPU-only run
then proves the code names its devices, which is what running on CUDA needs.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from autosquash.compress.apply import VariantCache, compress, quantized_tensors
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.operators import PRUNING
from autosquash.compress.plan import LayerChoice
from autosquash.compress.quantize import quantize
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor, dequantize
from autosquash.search.profile import relative_error
from tests.conftest import every_form_plan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _strict(device: str):
    """On the CPU, stray device-less tensors land on meta (and fail); on a GPU the default is the CPU, which
    fails the same way against CUDA inputs."""
    return torch.device("meta") if device == "cpu" else contextlib.nullcontext()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("type_name", QUANTIZABLE_TYPES)
def test_codecs_run_on_the_weights_device(device, type_name):
    torch.manual_seed(0)
    w, imp = torch.randn(6, 512) * 0.02, torch.rand(512)
    for importance in (None, imp):
        on_cpu = quantize(w, type_name, importance)
        with _strict(device):
            got = quantize(w.to(device), type_name, importance)
            decoded = dequantize(got, device)
        assert isinstance(got.data, np.ndarray)  # the bytes come back to host memory
        assert decoded.device.type == device
        if device == "cpu":
            assert np.array_equal(got.data, on_cpu.data)
            assert torch.equal(decoded, dequantize(on_cpu))
        else:
            # Another device may round a search's sums differently; its decoded weights stay as close to
            # the CPU's as one quantization step (a few percent of a block's range).
            assert torch.allclose(decoded.cpu(), dequantize(on_cpu), atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_a_plan_compresses_on_the_models_device_into_host_memory(device, tiny_model, tiny_arch, tiny_batch):
    stats = collect_stats(tiny_model, tiny_batch)
    want = compress(tiny_model, tiny_arch, every_form_plan(), stats)(tiny_batch).logits
    base = tiny_model.to(device)
    cache = VariantCache()
    with _strict(device):
        variants = list(quantized_tensors(base, tiny_arch, every_form_plan(), stats, cache))
    for _, _, variant in variants:
        for part in variant.parts.values():
            assert isinstance(part, QuantizedTensor) or part.device.type == "cpu"
    with _strict(device):
        model = compress(base, tiny_arch, every_form_plan(), stats, cache)
    assert {p.device.type for p in model.parameters()} == {device}
    got = model(tiny_batch.to(device)).logits.cpu()
    # The same bytes on the CPU; elsewhere, the other device's float arithmetic.
    assert torch.allclose(got, want, atol=1e-5 if device == "cpu" else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_sensitivity_errors_and_probes_run_on_the_models_device(device, tiny_model, tiny_arch, tiny_batch):
    from autosquash.compress.operators import deploy_linear

    stats = collect_stats(tiny_model, tiny_batch)
    block = tiny_model.to(device).model.layers[0]
    path = "mlp.down_proj"
    w = block.get_submodule(path).weight.data
    errors = []
    for choice in (LayerChoice(quant="Q4_K"), LayerChoice(quant="Q4_K", rank_ratio=0.25)):
        deploy = deploy_linear("blk.0.ffn_down", *w.shape, choice)
        with _strict(device):
            errors.append(relative_error(w, stats[f"model.layers.0.{path}"], deploy, seed=0))
    with _strict(device):
        swaps = {kind: op.probe_swaps(block, 0, tiny_arch, 1, stats) for kind, op in PRUNING.items()}
    assert 0 < errors[0] < errors[1] < 1
    for swap in swaps.values():
        (tensor,) = swap.values()
        assert tensor.device.type == device
