"""Truncated SVD factors, plain and activation-aware, and the two-linear layer that holds them."""

from __future__ import annotations

import torch

from autosquash.compress.operators.svd import LowRankLinear, svd_factors


def _weight(tiny_model) -> torch.Tensor:
    return tiny_model.model.layers[0].mlp.down_proj.weight.detach()  # (256, 512)


def test_full_rank_factors_reconstruct_the_weight(tiny_model):
    w = _weight(tiny_model)
    a, b = svd_factors(w, min(w.shape))
    assert a.shape == (256, 512) and b.shape == (256, 256)
    # float32 SVD of a 256-wide matrix: errors of about a hundred ulps of its largest entries (seen: 1.4e-7).
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-5 * w.abs().max().item())


def test_truncation_error_is_the_tail_of_the_singular_values(tiny_model):
    w = _weight(tiny_model)
    s = torch.linalg.svdvals(w)
    for rank in (16, 64, 200):
        a, b = svd_factors(w, rank)
        assert a.shape == (rank, 512) and b.shape == (256, rank)
        err_sq = (w - b @ a).pow(2).sum()
        # Eckart-Young: the Frobenius error squared is the sum of the dropped s_i²; 1e-4 covers float32 sums.
        torch.testing.assert_close(err_sq, s[rank:].pow(2).sum(), rtol=1e-4, atol=0)


def test_activation_aware_factors_cut_the_output_error_under_skewed_inputs(tiny_model):
    w = _weight(tiny_model)
    g = torch.Generator().manual_seed(0)
    channel_rms = torch.logspace(-2, 1, w.shape[1])[torch.randperm(w.shape[1], generator=g)]  # 1000x spread
    x = torch.randn(4096, w.shape[1], generator=g) * channel_rms
    input_sq = x.pow(2).mean(0)
    rank = 64

    def output_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (x @ (w - b @ a).T).pow(2).mean().item()

    plain, aware = output_err(*svd_factors(w, rank)), output_err(*svd_factors(w, rank, input_sq))
    # ASVD spends the rank on the channels the inputs use; with a 1000x spread the gain is large, not marginal.
    assert aware < 0.5 * plain


def test_low_rank_linear_computes_b_of_a_of_x_with_named_factors(tiny_model):
    a, b = svd_factors(_weight(tiny_model), 32)
    layer = LowRankLinear(a, b)
    assert isinstance(layer.lr_a, torch.nn.Linear) and isinstance(layer.lr_b, torch.nn.Linear)
    assert dict(layer.named_parameters()).keys() == {"lr_a.weight", "lr_b.weight"}  # the tensor names export uses
    assert torch.equal(layer.lr_a.weight, a) and torch.equal(layer.lr_b.weight, b)
    x = torch.randn(4, 64, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (4, 64, 256)
    torch.testing.assert_close(y, (x @ a.T) @ b.T)  # the same two float32 matmuls: default tolerances
