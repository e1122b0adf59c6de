"""A per-group sensitivity model of the base model, and an Optuna sampler that proposes plans from it.

Damage model: the KL to the base model of a plan is taken as the sum, over layer groups and the
embedding table, of each one's damage alone. A group's damage under an option is

    gain · (its linears' relative output errors from quantization or decomposition
            + the share of output energy its pruned channels carried),

where the errors come from the weights and the calibration statistics E[x²] (no forward pass;
quantization error on a fixed sample of rows, since every GGUF type quantizes rows independently),
and the gain is measured once per group: the KL of the model with only that group at its space's
most damaging option, over a few hundred calibration tokens, the pass starting at that group's block.
The embedding table's options are measured directly. Once per model, calibration set and space;
cached on disk.

Proposals: for a memory budget, the plan of least predicted damage that fits (a multiple-choice
knapsack: a Lagrangian sweep, then greedy upgrades into what is left). The sampler first proposes
one plan at each uniform baseline's size (the plans a search must beat) and at sizes between them,
then mutates plans of the front found so far, repairing each mutation back under its size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import torch

from autosquash.compress.apply import compress_kron, compress_linear, dense, quantize_rows
from autosquash.compress.calibrate import Stats
from autosquash.compress.gguf_types import legal_type, legal_type_or_f16
from autosquash.compress.plan import (
    ATTN_LINEARS,
    FFN_LINEARS,
    LayerChoice,
    Plan,
    deployed_tensors,
    factor_rank,
    kept_ffn_channels,
    kept_kv_heads,
    kron_terms,
)
from autosquash.compress.prune import input_channel_importance, kv_group_importance
from autosquash.compress.quant import dequantize, quantize
from autosquash.cost.model import kv_cache_bytes_per_token
from autosquash.evaluate.proxy import Reference, score
from autosquash.models.arch import Arch
from autosquash.search.space import GroupSpace, SearchSpace

FIELDS = ("quant", "ffn_keep_ratio", "attn_keep_ratio", "rank_ratio", "kron_rank")
SAMPLE_ROWS = 64  # rows per weight on which a quantization error is measured
PROBE_SEQS, PROBE_LEN = 4, 128  # calibration tokens of a probe pass: sequences, positions
VERSION = 4  # bump when the model changes, so cached profiles are recomputed


@dataclass
class GroupProfile:
    """One group's options: their Optuna parameter values, bytes deployed and predicted damage (KL)."""

    name: str
    options: list[dict]
    nbytes: list[int]
    damage: list[float]


@dataclass
class Profile:
    """The damage model of a (model, calibration set, search space): what the sampler plans with."""

    groups: list[GroupProfile]
    embed: GroupProfile  # options {"embed_quant": type}
    fixed_bytes: int  # norms, and the KV cache at the experiment's context
    gains: dict[str, float] = field(default_factory=dict)  # per group: KL per unit of relative output error

    def size(self, picks: list[int], embed_pick: int) -> int:
        return (
            self.fixed_bytes
            + self.embed.nbytes[embed_pick]
            + sum(g.nbytes[k] for g, k in zip(self.groups, picks, strict=True))
        )

    def damage(self, picks: list[int], embed_pick: int) -> float:
        return self.embed.damage[embed_pick] + sum(g.damage[k] for g, k in zip(self.groups, picks, strict=True))

    def params(self, picks: list[int], embed_pick: int) -> dict[str, object]:
        """The Optuna parameters of a choice of options (only dimensions with more than one choice)."""
        out: dict[str, object] = {}
        for g, k in zip(self.groups, picks, strict=True):
            out.update({f"{g.name}.{f}": v for f, v in g.options[k].items()})
        out.update(self.embed.options[embed_pick])
        return out

    def picks_of(self, params: dict[str, object]) -> tuple[list[int], int]:
        """The option indices of a trial's parameters (those it lacks take the group's first option)."""

        def find(g: GroupProfile, prefix: str) -> int:
            for k, opt in enumerate(g.options):
                if all(params.get(f"{prefix}{f}", v) == v for f, v in opt.items()):
                    return k
            return 0

        return [find(g, f"{g.name}.") for g in self.groups], find(self.embed, "")

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> Profile | None:
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            return None
        data["groups"] = [GroupProfile(**g) for g in data["groups"]]
        data["embed"] = GroupProfile(**data["embed"])
        return cls(**data)


def _options(space: GroupSpace) -> list[tuple[dict, LayerChoice]]:
    """Every combination of a group space's choices: its Optuna parameters (the fields searched) and
    the layer choice it makes."""
    searched = [f for f in FIELDS if len(getattr(space, f)) > 1]
    fixed = {f: getattr(space, f)[0] for f in FIELDS if f not in searched}
    combos = itertools.product(*(getattr(space, f) for f in searched))
    return [
        (dict(zip(searched, c, strict=True)), LayerChoice(**fixed, **dict(zip(searched, c, strict=True))))
        for c in combos
    ]


def _rows(n: int, seed: int) -> torch.Tensor:
    if n <= SAMPLE_ROWS:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:SAMPLE_ROWS].sort().values


def _weighted_energy(w: torch.Tensor, sq: torch.Tensor | None) -> float:
    s = sq if sq is not None else torch.ones(w.shape[1])
    return float((w.float().pow(2) * s).sum())


def relative_error(w: torch.Tensor, sq: torch.Tensor | None, quant: str, rank: int, terms: int, seed: int) -> float:
    """E||(W - Ŵ)x||² / E||Wx||² under diagonal input statistics, Ŵ the weight as a trial deploys it.

    Plain quantization is measured on a fixed sample of rows (GGUF quantizes rows independently);
    factorisations need the whole matrix.
    """
    if rank == 0 and terms == 0:
        sub = w[_rows(w.shape[0], seed)]
        deq = dequantize(quantize_rows(sub, quant, sq))
        return _weighted_energy(sub - deq, sq) / max(_weighted_energy(sub, sq), 1e-30)
    approx = dense(compress_kron(w, quant, terms, sq) if terms else compress_linear(w, quant, rank, sq))
    return _weighted_energy(w - approx, sq) / max(_weighted_energy(w, sq), 1e-30)


def _pruned_share(importance: torch.Tensor, keep: int) -> float:
    """Share of the weighted output energy carried by the channels (or groups) pruning drops."""
    energy = importance.float().pow(2)
    return float(1 - energy.topk(keep).values.sum() / energy.sum()) if keep > 0 else 1.0


class _Errors:
    """Relative errors of one block's linears, memoised per (tensor, type, rank, terms)."""

    def __init__(self, block: torch.nn.Module, i: int, stats: Stats):
        self.block, self.i, self.stats, self.memo = block, i, stats, {}

    def linear(self, gguf_name: str, path: str, choice: LayerChoice) -> float:
        w = self.block.get_submodule(path).weight.data
        sq = self.stats.get(f"model.layers.{self.i}.{path}")
        # The type as named: a factor's rows may fit a block type that W's rows do not (see quantize_rows).
        quant = choice.quant_for(gguf_name)
        rank = factor_rank(w.shape[0], w.shape[1], choice.rank_ratio)
        terms = kron_terms(w.shape[0], w.shape[1], choice.kron_rank)
        key = (gguf_name, quant, rank, terms)
        if key not in self.memo:
            seed = zlib.crc32(f"{self.i}.{gguf_name}".encode()) & 0xFFFF  # the same rows in every process
            lossless = legal_type_or_f16(quant, w.shape[1]) in ("F16", "F32") and not (rank or terms)
            self.memo[key] = 0.0 if lossless else relative_error(w, sq, quant, rank, terms, seed)
        return self.memo[key]


def _group_errors(
    block: torch.nn.Module, i: int, kind: str, arch: Arch, stats: Stats, choice: LayerChoice, errs: _Errors
) -> tuple[float, float]:
    """(quantization/decomposition error, pruned share) of block `i`'s `kind` group under `choice`."""
    if kind == "ffn":
        keep = kept_ffn_channels(arch, choice)
        if keep == 0:
            return 0.0, 1.0
        imp = input_channel_importance(block.mlp.down_proj.weight.data, stats.get(f"model.layers.{i}.mlp.down_proj"))
        pruned = _pruned_share(imp, keep) if keep < arch.intermediate_size else 0.0
        linears = FFN_LINEARS
    else:
        keep = kept_kv_heads(arch, choice)
        if keep == 0:
            return 0.0, 1.0
        imp = kv_group_importance(
            block.self_attn.o_proj.weight.data, stats.get(f"model.layers.{i}.self_attn.o_proj"), arch.n_kv_heads
        )
        pruned = _pruned_share(imp, keep) if keep < arch.n_kv_heads else 0.0
        linears = ATTN_LINEARS
    quant = sum(errs.linear(name, path, choice) for name, path in linears) * (1 - pruned)
    return quant, pruned


def _group_bytes(arch: Arch, group: str, choice: LayerChoice, context_tokens: int) -> int:
    """Bytes a group deploys under `choice`; an attention group adds its KV cache at the context."""
    i, kind = group.split(".")[1], group.split(".")[2]
    prefix = f"blk.{i}.{'attn' if kind == 'attn' else 'ffn'}"
    tensors = deployed_tensors(arch, Plan(groups={group: choice}))
    nbytes = sum(t.nbytes for t in tensors if t.name.startswith(prefix))
    if kind == "attn":
        nbytes += kv_cache_bytes_per_token(arch, kv_heads_per_layer=[kept_kv_heads(arch, choice)]) * context_tokens
    return nbytes


class _Replay(torch.nn.Module):
    """Stands in for the blocks before a probed one: hands on the base model's hidden states there."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


@torch.no_grad()
def _block_inputs(model: torch.nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states entering every block when the base model runs `batch`."""
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for b in model.model.layers]
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def _probe(
    model: torch.nn.Module, ref: Reference, swaps: dict[str, torch.Tensor], start: int = 0, hidden=None
) -> float:
    """KL to the base of `model` with the weights in `swaps` (module path -> weight) put in for one pass.

    With `start` > 0 the pass begins at block `start` from the base model's `hidden` states there:
    the blocks before it are unchanged, so their output is too.
    """
    saved = {p: model.get_submodule(p).weight.data for p in swaps}
    layers = model.model.layers
    try:
        for p, w in swaps.items():
            model.get_submodule(p).weight.data = w
        if start > 0:
            model.model.layers = torch.nn.ModuleList([_Replay(hidden), *layers[start:]])
        return max(score(model, ref)["kl"], 0.0)
    finally:
        model.model.layers = layers
        for p, w in saved.items():
            model.get_submodule(p).weight.data = w


def _prune_probe_swaps(block, i: int, kind: str, arch: Arch, choice: LayerChoice, stats: Stats) -> dict:
    """The group's output projection with its pruned input channels zeroed: the same function as pruning."""
    if kind == "ffn":
        path = "mlp.down_proj"
        keep = kept_ffn_channels(arch, choice)
        imp = input_channel_importance(block.mlp.down_proj.weight.data, stats.get(f"model.layers.{i}.{path}"))
    else:
        path = "self_attn.o_proj"
        keep = kept_kv_heads(arch, choice)
        width = block.self_attn.o_proj.weight.shape[1] // arch.n_kv_heads  # o's input channels per KV group
        o_sq = stats.get(f"model.layers.{i}.{path}")
        imp = kv_group_importance(block.self_attn.o_proj.weight.data, o_sq, arch.n_kv_heads).repeat_interleave(width)
        keep = keep * width
    w = block.get_submodule(path).weight.data.clone()
    mask = torch.ones(w.shape[1], dtype=torch.bool)
    if keep > 0:
        mask[imp.topk(keep).indices] = False
    w[:, mask] = 0
    return {f"model.layers.{i}.{path}": w}


def measure_profile(
    base: torch.nn.Module, arch: Arch, space: SearchSpace, stats: Stats, ref: Reference, context_tokens: int, log=print
) -> Profile:
    """Measure the damage model: per-group errors from the weights, one probe pass per group."""
    n, t = min(PROBE_SEQS, ref.batch.shape[0]), min(PROBE_LEN, ref.batch.shape[1])
    # The base's top-k at the first t positions do not depend on later tokens: a causal model.
    ref = Reference(ref.batch[:n, :t], ref.topk_logp[:n, : t - 1], ref.topk_idx[:n, : t - 1], ref.perplexity)
    hidden = _block_inputs(base, ref.batch)
    groups, gains = [], {}
    tty, every, started = sys.stdout.isatty(), max(1, arch.n_layers // 5), time.perf_counter()
    for i, block in enumerate(base.model.layers):
        errs = _Errors(block, i, stats)
        for kind, gspace, linears in (("attn", space.attn, ATTN_LINEARS), ("ffn", space.ffn, FFN_LINEARS)):
            name = f"blk.{i}.{kind}"
            options = _options(gspace)
            choices = [c for _, c in options]
            errors = [sum(_group_errors(block, i, kind, arch, stats, c, errs)) for c in choices]
            gain = 0.0
            if max(errors) > 0:
                gain = _gain(base, ref, block, i, kind, arch, choices, errors, linears, stats, hidden[i])
            gains[name] = gain
            groups.append(
                GroupProfile(
                    name,
                    [params for params, _ in options],
                    [_group_bytes(arch, name, c, context_tokens) for c in choices],
                    [gain * e for e in errors],
                )
            )
        if tty or (i + 1) % every == 0 or i + 1 == arch.n_layers:  # a log file gets a line per fifth
            done = f"  sensitivity: block {i + 1}/{arch.n_layers}, {time.perf_counter() - started:.0f} s"
            log(done, end="\r" if tty else "\n", flush=True)
    if tty:
        log("")
    embed = _embed_profile(base, arch, space, ref)
    # Block norms belong to their group (a removed sublayer drops its norm); the final norm is fixed.
    fixed = sum(t.nbytes for t in deployed_tensors(arch, Plan()) if t.name == "output_norm.weight")
    return Profile(groups, embed, fixed, gains)


def _fast_to_quantize(block, linears, choice: LayerChoice) -> bool:
    if choice.rank_ratio or choice.kron_rank:
        return False
    types = {legal_type_or_f16(choice.quant_for(n), block.get_submodule(p).weight.shape[1]) for n, p in linears}
    return not any(t.endswith("_K") or t.startswith("TQ") for t in types)


def _gain(base, ref, block, i, kind, arch, choices, errors, linears, stats, hidden) -> float:
    """KL per unit of relative output error of one group, from one probe pass.

    The probe is the group's most damaging unpruned option (its quantization error passes through
    the same sublayer output as a pruned channel's would); with nothing but pruning to probe, the
    most damaging pruning, unquantized.
    """
    unpruned = [k for k, c in enumerate(choices) if c.ffn_keep_ratio == 1 and c.attn_keep_ratio == 1]
    k = max(unpruned or range(len(choices)), key=lambda k: errors[k])
    # Any option with a large error measures the gain; legacy block types quantize far faster than
    # K-quants (whose scale search is costly), so take one when its error is within 4x of the largest.
    fast = [j for j in unpruned if _fast_to_quantize(block, linears, choices[j]) and errors[j] >= errors[k] / 4]
    k = max(fast, key=lambda j: errors[j]) if fast else k
    c = choices[k]
    if errors[k] == 0:
        return 0.0
    if c.ffn_keep_ratio == 1 and c.attn_keep_ratio == 1:
        swaps = _dense_swaps(block, i, linears, c, stats)
        error = errors[k]
    else:
        c = c.model_copy(update={"quant": "F16", "tensor_quant": {}, "rank_ratio": 0.0, "kron_rank": 0})
        swaps = _prune_probe_swaps(block, i, kind, arch, c, stats)
        error = sum(_group_errors(block, i, kind, arch, stats, c, _Errors(block, i, stats)))
    return _probe(base, ref, swaps, i, hidden) / max(error, 1e-12)


def _dense_swaps(block, i: int, linears, choice: LayerChoice, stats: Stats) -> dict[str, torch.Tensor]:
    out = {}
    for name, path in linears:
        w = block.get_submodule(path).weight.data
        sq = stats.get(f"model.layers.{i}.{path}")
        quant = choice.quant_for(name)
        rank = factor_rank(w.shape[0], w.shape[1], choice.rank_ratio)
        terms = kron_terms(w.shape[0], w.shape[1], choice.kron_rank)
        variant = compress_kron(w, quant, terms, sq) if terms else compress_linear(w, quant, rank, sq)
        out[f"model.layers.{i}.{path}"] = dense(variant)
    return out


def _embed_profile(base: torch.nn.Module, arch: Arch, space: SearchSpace, ref: Reference) -> GroupProfile:
    """Every embedding option measured directly (it is also the output head when tied)."""
    emb = base.model.embed_tokens
    options, nbytes, damage = [], [], []
    for q in space.embed_quant:
        t = legal_type(q, arch.hidden_size)
        deq = dequantize(quantize(emb.weight.data, t, None))
        damage.append(_probe(base, ref, {"model.embed_tokens": deq}))
        plan = Plan(embed_quant=q)
        tables = ("token_embd.weight", "output.weight")
        nbytes.append(sum(x.nbytes for x in deployed_tensors(arch, plan) if x.name in tables))
        options.append({"embed_quant": q} if len(space.embed_quant) > 1 else {})
    return GroupProfile("embed", options, nbytes, damage)


def cached_profile(
    base, arch: Arch, space: SearchSpace, stats: Stats, ref: Reference, context_tokens: int, key: str, cache_dir: Path
) -> Profile:
    """`measure_profile`, read from `cache_dir` when the same model, data and space were measured before."""
    digest = hashlib.sha256(
        f"{key}|{space.model_dump_json()}|{context_tokens}|{VERSION}".encode() + ref.batch.numpy().tobytes()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"sensitivity-{digest}.json"
    if path.exists():
        profile = Profile.from_json(path.read_text())
        if profile is not None:
            return profile
    print("measuring per-group sensitivity (once per model, calibration set and space) ...", flush=True)
    profile = measure_profile(base, arch, space, stats, ref, context_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile


def best_under(profile: Profile, budget: int) -> tuple[list[int], int] | None:
    """The options of least predicted damage whose total size is at most `budget` (None if nothing fits).

    A Lagrangian sweep (each group minimises damage + λ·bytes) finds the hull plan just under the
    budget; greedy upgrades (best damage saved per byte) then spend what is left.
    """
    parts = [*profile.groups, profile.embed]

    def pick(lam: float) -> list[int]:
        return [min(range(len(g.nbytes)), key=lambda k: (g.damage[k] + lam * g.nbytes[k], g.nbytes[k])) for g in parts]

    def size(picks: list[int]) -> int:
        return profile.fixed_bytes + sum(g.nbytes[k] for g, k in zip(parts, picks, strict=True))

    smallest = [min(range(len(g.nbytes)), key=lambda k: (g.nbytes[k], g.damage[k])) for g in parts]
    if size(smallest) > budget:
        return None
    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget and hi < 1e12:
        hi *= 4
    if size(pick(hi)) > budget:
        picks = smallest
    else:
        for _ in range(60):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
            if size(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        picks = pick(hi)
    room = budget - size(picks)
    # Upgrades that fit what is left, best damage saved per byte first.
    while move := _best_move(parts, picks, _upgrade_within(room)):
        j, k = move
        room -= parts[j].nbytes[k] - parts[j].nbytes[picks[j]]
        picks[j] = k
    return picks[:-1], picks[-1]


class SensitivitySampler(optuna.samplers.BaseSampler):
    """Proposes whole plans from a `Profile`: knapsack plans at target sizes, then repaired mutations
    of the front. Enqueued trials (the uniform baselines) keep their fixed parameters."""

    def __init__(self, profile: Profile, targets: list[int], seed: int = 0, mutations: int = 3):
        self.profile, self.targets, self.mutations = profile, targets, mutations
        self._rng = random.Random(seed)
        self._plans: dict[int, dict[str, object]] = {}

    # Optuna's sampler interface: every parameter comes from the plan chosen when the trial starts.
    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "fixed_params" in trial.system_attrs:  # an enqueued trial (a baseline, a retried plan)
            return
        trials = study.get_trials(deepcopy=False)
        seen = {_key(t.params) for t in trials if t.params}
        used = [t.system_attrs["sensitivity.target"] for t in trials if "sensitivity.target" in t.system_attrs]
        n, params = (max(used) + 1 if used else 0), None
        while n < len(self.targets) and params is None:
            found = best_under(self.profile, self.targets[n])
            if found is not None and _key(self.profile.params(*found)) not in seen:
                params = self.profile.params(*found)
            else:
                n += 1
        kind = "proposed"
        if params is None:
            kind = "mutated"
            for _ in range(50):  # a plan not tried yet, if one is found
                params = self._mutate(study)
                if _key(params) not in seen:
                    break
        else:
            study._storage.set_trial_system_attr(trial._trial_id, "sensitivity.target", n)
        study._storage.set_trial_system_attr(trial._trial_id, "sensitivity.kind", kind)
        study._storage.set_trial_user_attr(trial._trial_id, "origin", kind)
        self._plans[trial._trial_id] = params

    def sample_independent(self, study, trial, param_name, param_distribution):
        params = self._plans.get(trial._trial_id, {})
        choices = getattr(param_distribution, "choices", ())
        if param_name in params and params[param_name] in choices:
            return params[param_name]
        return optuna.samplers.RandomSampler(seed=self._rng.randrange(2**31)).sample_independent(
            study, trial, param_name, param_distribution
        )

    def after_trial(self, study, trial, state, values) -> None:
        self._plans.pop(trial._trial_id, None)

    def _mutate(self, study: optuna.Study) -> dict[str, object]:
        """A front plan with a few groups moved to other options, then repaired to fit its old size."""
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            found = best_under(self.profile, max(self.targets)) if self.targets else None
            return self.profile.params(*found) if found else {}
        front = [t for t in done if not any(_dominates(o.values, t.values) for o in done)]
        parent = self._rng.choice(front)
        picks, embed = self.profile.picks_of(parent.params)
        budget = self.profile.size(picks, embed)
        for j in self._rng.sample(range(len(picks)), min(self.mutations, len(picks))):
            picks[j] = self._rng.randrange(len(self.profile.groups[j].nbytes))
        picks, embed = _repair(self.profile, picks, embed, budget)
        return self.profile.params(picks, embed)


def _upgrade_within(room: int):
    """Score of a change that lowers damage and adds at most `room` bytes: damage saved per byte."""
    return lambda db, dd: -dd / max(db, 1) if dd < 0 and db <= room else None


def _best_move(parts: list[GroupProfile], picks: list[int], score) -> tuple[int, int] | None:
    """The (part, option) change of highest `score(bytes added, damage added)`; None scores rule one out."""
    best = None
    for j, g in enumerate(parts):
        for k in range(len(g.nbytes)):
            value = score(g.nbytes[k] - g.nbytes[picks[j]], g.damage[k] - g.damage[picks[j]])
            if value is not None and (best is None or value > best[0]):
                best = (value, j, k)
    return None if best is None else best[1:]


def _key(params: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in params.items()))


def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _repair(profile: Profile, picks: list[int], embed: int, budget: int) -> tuple[list[int], int]:
    """Shrink the groups that lose least predicted damage per byte saved until the plan fits `budget`."""
    parts = [*profile.groups, profile.embed]
    picks = [*picks, embed]
    size = profile.fixed_bytes + sum(g.nbytes[k] for g, k in zip(parts, picks, strict=True))
    # Downgrades, least damage added per byte saved first.
    while size > budget and (move := _best_move(parts, picks, lambda db, dd: -dd / -db if db < 0 else None)):
        j, k = move
        size += parts[j].nbytes[k] - parts[j].nbytes[picks[j]]
        picks[j] = k
    return picks[:-1], picks[-1]


def proposal_targets(profile: Profile, baseline_sizes: list[int], extra: int = 4) -> list[int]:
    """Sizes to propose at: each uniform baseline's, smallest first, then sizes between the smaller ones."""
    sizes = sorted(set(baseline_sizes))
    smallest = profile.size(*_smallest(profile))
    between = []
    lows = [smallest, *sizes]
    for a, b in itertools.pairwise(lows):
        between.append((a + b) // 2)
    return sizes + sorted(between)[:extra]


def _smallest(profile: Profile) -> tuple[list[int], int]:
    pick = [min(range(len(g.nbytes)), key=lambda k: g.nbytes[k]) for g in profile.groups]
    return pick, min(range(len(profile.embed.nbytes)), key=lambda k: profile.embed.nbytes[k])
