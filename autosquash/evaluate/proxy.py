"""Per-trial quality proxies on a fixed held-out token set: perplexity and KL to the base model.

The base model's next-token distribution is kept as its top-k log-probabilities plus the mass of
the rest (a tail bucket), computed once per search; the KL over those k+1 outcomes is a lower bound
of the full KL that is tight when the top-k hold most of the mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK_SEQS = 4  # sequences per forward pass: bounds the (batch, seq, vocab) logits in memory


@dataclass(frozen=True)
class Reference:
    """The base model's top-k next-token log-probabilities on a token batch."""

    batch: torch.Tensor  # (n_seq, seq_len) token ids
    topk_logp: torch.Tensor  # (n_seq, seq_len - 1, k)
    topk_idx: torch.Tensor  # (n_seq, seq_len - 1, k)
    perplexity: float


def _logp_chunks(model: torch.nn.Module, batch: torch.Tensor):
    device = next(model.parameters()).device
    for start in range(0, batch.shape[0], CHUNK_SEQS):
        ids = batch[start : start + CHUNK_SEQS].to(device)
        logits = model(ids).logits[:, :-1].float()
        yield ids, torch.log_softmax(logits, dim=-1)


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def reference(model: torch.nn.Module, batch: torch.Tensor, k: int = 32) -> Reference:
    """Run the base model once over `batch` and keep what the proxies need."""
    vals, idxs, nll = [], [], []
    for ids, logp in _logp_chunks(model, batch):
        v, i = logp.topk(k, dim=-1)
        vals.append(v)
        idxs.append(i.to(torch.int32))
        nll.append(_nll(logp, ids))
    mean_nll = torch.cat(nll).mean().item()
    # Kept on the CPU: a search ships the reference to its workers, whatever device each one runs on.
    return Reference(batch.cpu(), torch.cat(vals).cpu(), torch.cat(idxs).cpu(), math.exp(mean_nll))


@torch.no_grad()
def perplexity(model: torch.nn.Module, batch: torch.Tensor, first: int = 0) -> float:
    """Perplexity over the tokens each row predicts from position `first` on (0: every position; llama.cpp's
    llama-perplexity scores only the second half of each window, first = seq_len // 2)."""
    nll = [_nll(logp, ids)[:, first:] for ids, logp in _logp_chunks(model, batch)]
    mean_nll = torch.cat(nll).mean().item()
    return math.exp(mean_nll) if math.isfinite(mean_nll) else math.inf


def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per position over the base's top-k tokens plus one tail bucket."""
    p = ref_logp.exp()
    q_logp = logp.gather(-1, ref_idx.long())
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q_logp.exp().sum(-1)).clamp_min(1e-12)
    return (p * (ref_logp - q_logp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


@torch.no_grad()
def score(model: torch.nn.Module, ref: Reference) -> dict[str, float]:
    """Perplexity of `model` on the reference batch and its mean KL to the base model (nats/token)."""
    nll, kl = [], []
    start = 0
    for ids, logp in _logp_chunks(model, ref.batch):
        n = ids.shape[0]
        nll.append(_nll(logp, ids))
        ref_logp, ref_idx = ref.topk_logp[start : start + n], ref.topk_idx[start : start + n]
        kl.append(topk_kl(ref_logp.to(logp.device), ref_idx.to(logp.device), logp))
        start += n
    mean_nll = torch.cat(nll).mean().item()
    return {
        "perplexity": math.exp(mean_nll) if math.isfinite(mean_nll) else math.inf,
        "kl": torch.cat(kl).mean().item(),
    }
