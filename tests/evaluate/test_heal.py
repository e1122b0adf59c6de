import torch

from autosquash.compress.apply import compress
from autosquash.compress.plan import Plan
from autosquash.evaluate.heal import HealConfig, adapter_tensors, heal
from autosquash.evaluate.proxy import reference, score


def test_healing_lowers_kl_on_its_training_batch(tiny_model, tiny_arch, tiny_batch):
    ref = reference(tiny_model, tiny_batch, k=16)
    damaged = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q2_K"), {})
    before = score(damaged, ref)["kl"]
    healed, info = heal(damaged, ref, HealConfig(steps=12, rank=4, lr=3e-3, batch_seqs=4))
    assert info["heal_steps"] == 12
    assert score(healed, ref)["kl"] < before


def test_adapter_is_counted_in_f16(tiny_model, tiny_arch, tiny_batch):
    ref = reference(tiny_model, tiny_batch, k=4)
    healed, _ = heal(
        compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q8_0"), {}),
        ref,
        HealConfig(steps=1, rank=4, only_if_better=False),
    )
    tensors = adapter_tensors(healed)
    assert len(tensors) == 2 * 7 * tiny_arch.n_layers  # A and B for each of the 7 linears per block
    assert all(t.type == "F16" and 4 in t.shape for t in tensors)
    assert sum(t.nbytes for t in tensors) == 2 * sum(t.shape[0] * t.shape[1] for t in tensors)


def test_no_steps_means_no_adapter(tiny_model, tiny_arch, tiny_batch):
    ref = reference(tiny_model, tiny_batch, k=4)
    model, info = heal(tiny_model, ref, HealConfig(steps=0))
    assert model is tiny_model and info == {"heal_steps": 0} and adapter_tensors(model) == []
    assert torch.isfinite(model(tiny_batch).logits).all()


def test_a_model_without_linears_is_left_unhealed(tiny_model, tiny_arch, tiny_batch):
    from autosquash.compress.plan import LayerChoice

    ref = reference(tiny_model, tiny_batch, k=4)
    gone = LayerChoice(quant="Q8_0", attn_keep_ratio=0.0, ffn_keep_ratio=0.0)
    plan = Plan(groups={f"blk.{i}.{g}": gone for i in range(tiny_arch.n_layers) for g in ("attn", "ffn")})
    model, info = heal(compress(tiny_model, tiny_arch, plan, {}), ref, HealConfig(steps=2, rank=4))
    assert info == {"heal_steps": 0} and torch.isfinite(model(tiny_batch).logits).all()


def test_float_weights_get_the_adapter_merged_in_f16(tiny_model, tiny_arch, tiny_batch):
    from autosquash.search.trial import merges_adapter

    ref = reference(tiny_model, tiny_batch, k=8)
    f16, q8 = Plan.uniform(tiny_arch, "F16"), Plan.uniform(tiny_arch, "Q8_0")
    assert merges_adapter(tiny_arch, f16) and not merges_adapter(tiny_arch, q8)
    # F16 of this float32 model is lossless, so the check would drop any adapter: merging is what is tested.
    cfg = HealConfig(steps=4, rank=4, lr=3e-3, batch_seqs=4, only_if_better=False)
    kept, _ = heal(compress(tiny_model, tiny_arch, f16, {}), ref, cfg, seed=1)
    merged, info = heal(compress(tiny_model, tiny_arch, f16, {}), ref, cfg, seed=1, merge=True)
    assert info["heal_merged"] == 1.0 and adapter_tensors(merged) == [] and adapter_tensors(kept)
    w = merged.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, w.half().float())  # still exactly on the F16 grid the file stores
    with torch.no_grad():
        diff = (merged(tiny_batch).logits - kept(tiny_batch).logits).abs().max().item()
    assert diff < 1e-2  # merging only adds F16 rounding of the merged weights


def test_checkpointed_healing_trains_the_same_adapter(tiny_model, tiny_arch, tiny_batch):
    """Over its activation budget, healing recomputes blocks in the backward pass: bitwise the same adapter
    (the recomputed forward runs the same ops in the same order), so whether a trial checkpointed does not
    change what it scores or exports; the summary says it did."""
    from autosquash.evaluate.heal import ACTIVATION_BUDGET, activation_bytes

    assert activation_bytes(tiny_model.config, 2 * tiny_batch.shape[1]) < ACTIVATION_BUDGET
    ref = reference(tiny_model, tiny_batch, k=16)
    cfg = HealConfig(steps=3, rank=4, lr=3e-3, batch_seqs=2)
    runs = []
    for budget in (ACTIVATION_BUDGET, 1):
        damaged = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q2_K"), {})
        healed, info = heal(damaged, ref, cfg, seed=0, activation_budget=budget)
        runs.append((info, {n: p.detach().clone() for n, p in healed.named_parameters() if "lora_" in n}))
        assert not healed.base_model.model.is_activation_checkpointing  # switched off again for scoring
    (plain, a), (checkpointed, b) = runs
    assert plain["heal_checkpointed"] == 0.0 and checkpointed["heal_checkpointed"] == 1.0
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_an_adapter_that_does_not_pay_is_dropped_and_one_that_does_is_kept(tiny_model, tiny_arch, tiny_batch):
    import torch

    ref = reference(tiny_model, tiny_batch, k=4)
    # F16 of a float32 model: nothing to heal (KL about 1e-9); any adapter only adds error and bytes.
    lossless = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "F16"), {})
    kept, info = heal(lossless, ref, HealConfig(steps=2, rank=4, lr=3e-3, batch_seqs=2))
    assert info["heal_kept"] == 0.0 and info["heal_check_healed_kl"] >= info["heal_check_unhealed_kl"]
    assert adapter_tensors(kept) == []
    plain = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "F16"), {})
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), plain.state_dict().values(), strict=True))
    damaged = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q2_K"), {})
    healed, info = heal(damaged, ref, HealConfig(steps=12, rank=4, lr=3e-3, batch_seqs=4))
    assert info["heal_kept"] == 1.0 and info["heal_check_healed_kl"] < info["heal_check_unhealed_kl"]
    assert adapter_tensors(healed)
