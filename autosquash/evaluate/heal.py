"""Brief LoRA healing (peft) of a compressed model, distilling from the base model's top-k outputs.

The compressed weights stay frozen on their quantization grid; the adapter is what training adds,
and it is deployed beside them (a GGUF LoRA adapter), so the cost model counts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from autosquash.compress.plan import TensorSpec
from autosquash.evaluate.proxy import Reference, topk_kl


@dataclass(frozen=True)
class HealConfig:
    """How much healing a trial gets; steps=0 turns it off."""

    steps: int = 8
    rank: int = 8
    lr: float = 5e-4
    batch_seqs: int = 2
    # Keep the adapter only where it lowers the KL of the first calibration row (after rounding to F16, as
    # deployed): an adapter that does not pay its bytes back in quality is dropped (a lossless plan stays so).
    only_if_better: bool = True


# Healing's activation memory above which it recomputes each block in the backward pass instead of keeping
# its activations (gradient checkpointing: one more forward per step; measured on 2 CPU cores at 360M and
# 1.1B parameters, about 1.7x the healing time). A search derives its own (search.trial.heal_budget).
ACTIVATION_BUDGET = 3 << 30


def activation_bytes(config, tokens: int) -> int:
    """Peak extra memory of one healing step on `tokens` tokens of a decoder with this config: per block,
    the saved inputs of norms, linears, attention and the gated MLP (about 10 hidden + 5 intermediate
    values per token), and per token four vocabulary-wide float tensors (logits, log-probabilities and
    their gradients); twice that, as measured (the backward's transient gradients and the allocator's
    slack: SmolLM2-135M and a 1.1B Llama took 1.6-2.2x this count above the model's own memory)."""
    per_token = config.num_hidden_layers * (10 * config.hidden_size + 5 * config.intermediate_size)
    return 2 * 4 * tokens * (per_token + 4 * config.vocab_size)


def _targets(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def heal(
    model: torch.nn.Module,
    teacher: Reference,
    cfg: HealConfig,
    seed: int = 0,
    merge: bool = False,
    activation_budget: int = ACTIVATION_BUDGET,
):
    """Train a LoRA adapter on `teacher.batch` to match the base model's top-k next-token distribution.

    Returns the healed model and a summary of the run. The adapter stays attached (deployed beside
    quantized weights as a GGUF LoRA file), its A and B rounded to F16 as that file stores them, unless
    `merge`: for weights stored in F16, where merging keeps them in their format; the merged weights
    are rounded to F16, as the file stores them. Either way the model scores what its export holds.

    When a step's activations would exceed `activation_budget` bytes, the blocks are checkpointed (the same
    gradients, bitwise; activation memory of about one block).
    """
    targets = _targets(model)
    if cfg.steps == 0 or not targets:  # nothing to heal: every linear was pruned away or decomposed
        return model, {"heal_steps": 0}
    from peft import LoraConfig, get_peft_model  # here: importing peft costs seconds, which a plan left unhealed skips

    torch.manual_seed(seed)
    start = time.perf_counter()
    checkpoint = activation_bytes(model.config, cfg.batch_seqs * teacher.batch.shape[1]) > activation_budget
    if checkpoint:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(
        model, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, target_modules=targets)
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    losses, unhealed = _train(peft_model, params, teacher, cfg, device)
    if checkpoint:
        model.activation_checkpointing_disable()
    summary = {
        "heal_steps": cfg.steps,
        "heal_loss_first": losses[0],
        "heal_loss_last": losses[-1],
        "heal_checkpointed": float(checkpoint),
    }
    with torch.no_grad():
        for p in params:
            p.copy_(p.half().to(p.dtype))  # as the GGUF LoRA file stores them (and before a merge)
    if cfg.only_if_better:
        healed = _row_kl(peft_model, teacher, device)
        summary.update(heal_check_unhealed_kl=unhealed, heal_check_healed_kl=healed)
        if not healed < unhealed:
            # Not worth its bytes: the compressed model as it was, without the LoRA layers.
            return peft_model.unload(), {**summary, "heal_kept": 0.0, "heal_s": time.perf_counter() - start}
        summary["heal_kept"] = 1.0
    if merge:
        return _merged(peft_model, targets), {**summary, "heal_s": time.perf_counter() - start, "heal_merged": 1.0}
    return peft_model, {**summary, "heal_s": time.perf_counter() - start}


def _train(
    peft_model: torch.nn.Module, params: list[torch.nn.Parameter], teacher: Reference, cfg: HealConfig, device
) -> tuple[list[float], float]:
    """Train `params` (the adapter's) for `cfg.steps` AdamW steps on the top-k KL to `teacher`, cycling through its
    rows: (each step's loss, the KL of row 0 before any update)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n_seq = teacher.batch.shape[0]
    losses = []
    peft_model.train()
    for step in range(cfg.steps):
        rows = torch.arange(step * cfg.batch_seqs, (step + 1) * cfg.batch_seqs) % n_seq
        logits = peft_model(teacher.batch[rows].to(device)).logits[:, :-1].float()
        logp, idx = teacher.topk_logp[rows].to(device), teacher.topk_idx[rows].to(device)
        kl = topk_kl(logp, idx, torch.log_softmax(logits, -1))
        if step == 0:
            unhealed = kl[0].mean().item()  # the only-if-better check's baseline, for free
        loss = kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peft_model.eval()
    return losses, unhealed


def _merged(peft_model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """The adapter merged into its linears, whose weights are rounded to F16 as the GGUF file stores them."""
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        for name in targets:
            w = merged.get_submodule(name).weight
            w.copy_(w.half().to(w.dtype))
    return merged


@torch.no_grad()
def _row_kl(model: torch.nn.Module, teacher: Reference, device) -> float:
    """Mean KL to the teacher on its first row (one forward pass of one sequence)."""
    logits = model(teacher.batch[:1].to(device)).logits[:, :-1].float()
    logp, idx = teacher.topk_logp[:1].to(device), teacher.topk_idx[:1].to(device)
    return topk_kl(logp, idx, torch.log_softmax(logits, -1)).mean().item()


def adapter_tensors(model: torch.nn.Module) -> list[TensorSpec]:
    """The LoRA adapter's tensors as deployed (F16 in a GGUF LoRA file), for the cost model."""
    out = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            macs = p.shape[0] * p.shape[1]
            out.append(TensorSpec(name, tuple(p.shape), "F16", macs))
    return out
