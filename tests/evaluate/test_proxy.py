import math

import torch

from autosquash.evaluate.proxy import reference, score, topk_kl


def test_base_model_scores_zero_kl_and_its_own_perplexity(tiny_model, tiny_batch):
    ref = reference(tiny_model, tiny_batch, k=8)
    s = score(tiny_model, ref)
    assert abs(s["kl"]) < 1e-6
    assert math.isclose(s["perplexity"], ref.perplexity, rel_tol=1e-6)


def test_topk_kl_is_a_lower_bound_of_the_full_kl():
    g = torch.Generator().manual_seed(0)
    p_logp = torch.log_softmax(torch.randn(50, 100, generator=g) * 3, -1)
    q_logp = torch.log_softmax(torch.randn(50, 100, generator=g) * 3, -1)
    full = (p_logp.exp() * (p_logp - q_logp)).sum(-1)
    vals, idx = p_logp.topk(10, -1)
    approx = topk_kl(vals, idx, q_logp)
    assert (approx <= full + 1e-5).all()  # log-sum inequality: merging outcomes never raises KL
    vals, idx = p_logp.topk(100, -1)
    torch.testing.assert_close(topk_kl(vals, idx, q_logp), full, rtol=1e-4, atol=1e-4)  # k = vocab: exact


def test_perturbed_model_has_positive_kl(tiny_model, tiny_batch):
    ref = reference(tiny_model, tiny_batch, k=8)
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    assert score(tiny_model, ref)["kl"] > 1e-4
