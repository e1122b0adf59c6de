"""A per-group sensitivity model of the base model (the damage model), measured once and cached on disk.

The KL to the base model of a plan is taken as the sum, over layer groups and the embedding table, of each one's
damage alone. A group's damage under an option is

    gain · (its linears' relative output errors from quantization or decomposition
            + the share of output energy its pruned channels carried),

where the errors come from the weights and the calibration statistics E[x²] (no forward pass;
quantization error on a fixed sample of rows, since every GGUF type quantizes rows independently),
and the gain is measured once per group: the KL of the model with only that group at its space's
most damaging option, over a few hundred calibration tokens, the pass starting at that group's block.
The embedding table's options are measured directly. Once per model, calibration set and space;
cached on disk. search/sensitivity.py proposes plans from it.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from autosquash.compress.apply import VariantCache, dense, linear_variant, table_variant
from autosquash.compress.calibrate import Stats, compensation_of
from autosquash.compress.operators import PRUNING, REGISTRY, SEARCHED_FIELDS, deploy_linear
from autosquash.compress.operators.base import LinearDeploy, Pruning, weight_of
from autosquash.compress.plan import SUBLAYERS, LayerChoice, Plan, deployed_tensors, kept_kv_heads
from autosquash.cost.model import kv_cache_bytes_per_token
from autosquash.evaluate.proxy import Reference, score
from autosquash.files import content_key, write_text
from autosquash.formats.codecs import dequantize
from autosquash.models.arch import Arch
from autosquash.models.device import to_compute
from autosquash.search.space import GroupSpace, SearchSpace
from autosquash.search.tensor_options import tensor_options

SAMPLE_ROWS = 64  # rows per weight on which a quantization error is measured


PROBE_SEQS, PROBE_LEN = 4, 128  # calibration tokens of a probe pass: sequences, positions


VERSION = 9  # bump when the model changes, so cached profiles are recomputed


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

    def size(self, picks: list[int], embed_pick: int) -> int:
        """Bytes a choice of options deploys (KV cache at the context included)."""
        return (
            self.fixed_bytes
            + self.embed.nbytes[embed_pick]
            + sum(g.nbytes[k] for g, k in zip(self.groups, picks, strict=True))
        )

    def damage(self, picks: list[int], embed_pick: int) -> float:
        """Predicted KL of a choice of options: the sum of each part's damage alone."""
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
        """The profile as JSON, with the model version that made it."""
        return json.dumps({"version": VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> Profile | None:
        """A profile read back, or None when an older damage model wrote it."""
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            return None
        data["groups"] = [GroupProfile(**g) for g in data["groups"]]
        data["embed"] = GroupProfile(**data["embed"])
        return cls(**data)


def _options(space: GroupSpace) -> list[tuple[dict, LayerChoice]]:
    """Every combination of a group space's choices: its Optuna parameters (the fields searched) and
    the layer choice it makes."""
    searched = [f for f in SEARCHED_FIELDS if len(getattr(space, f)) > 1]
    fixed = {f: getattr(space, f)[0] for f in SEARCHED_FIELDS if f not in searched}
    combos = itertools.product(*(getattr(space, f) for f in searched))
    return [
        (dict(zip(searched, c, strict=True)), LayerChoice(**fixed, **dict(zip(searched, c, strict=True))))
        for c in combos
    ]


def _rows(n: int, seed: int) -> torch.Tensor:
    if n <= SAMPLE_ROWS:
        return torch.arange(n, device="cpu")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g, device="cpu")[:SAMPLE_ROWS].sort().values


def _weighted_energy(w: torch.Tensor, sq: torch.Tensor | None) -> float:
    s = sq.to(w.device) if sq is not None else torch.ones(w.shape[1], device=w.device)
    return float((w.float().pow(2) * s).sum())


def relative_error(w: torch.Tensor, sq: torch.Tensor | None, deploy: LinearDeploy, seed: int) -> float:
    """E||(W - Ŵ)x||² / E||Wx||² under diagonal input statistics, Ŵ the weight as `deploy` stores it.

    A form that compresses rows independently (plain quantization) is measured on a fixed sample of rows;
    factorisations need the whole matrix.
    """
    if deploy.form.row_separable:
        w = w[_rows(w.shape[0], seed)]
    approx = dense(deploy.compress(w, sq), w.device)
    return _weighted_energy(w - approx, sq) / max(_weighted_energy(w, sq), 1e-30)


class _Errors:
    """Relative errors of one block's linears, memoised per deployed tensors."""

    def __init__(self, block: torch.nn.Module, i: int, stats: Stats):
        self.block, self.i, self.stats, self.memo = block, i, stats, {}

    def linear(self, gguf_name: str, path: str, choice: LayerChoice) -> float:
        """The error of one linear under `choice`, measured on the unpruned weight (pruning scales it)."""
        w = weight_of(self.block, path)
        deploy = deploy_linear(f"blk.{self.i}.{gguf_name}", w.shape[0], w.shape[1], choice)
        if deploy.key not in self.memo:
            seed = zlib.crc32(f"{self.i}.{gguf_name}".encode()) & 0xFFFF  # the same rows in every process
            sq = self.stats.get(f"model.layers.{self.i}.{path}")
            self.memo[deploy.key] = 0.0 if _lossless(deploy) else relative_error(w, sq, deploy, seed)
        return self.memo[deploy.key]


def _lossless(deploy: LinearDeploy) -> bool:
    return deploy.form.plain and all(t.type in ("F16", "F32") for t in deploy.tensors)


def _group_errors(
    block: torch.nn.Module, i: int, kind: str, arch: Arch, stats: Stats, choice: LayerChoice, errs: _Errors
) -> tuple[float, float]:
    """(quantization/decomposition error, pruned share) of block `i`'s `kind` group under `choice`."""
    op = PRUNING[kind]
    keep = op.kept(arch, choice)
    if keep == 0:
        return 0.0, 1.0
    pruned = op.pruned_share(block, i, arch, keep, stats) if keep < op.full(arch) else 0.0
    quant = sum(errs.linear(name, path, choice) for name, path in dict(SUBLAYERS)[kind]) * (1 - pruned)
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
        model(batch.to(next(model.parameters()).device))
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
            model.get_submodule(p).weight.data = to_compute(w, model)
        if start > 0:
            model.model.layers = torch.nn.ModuleList([_Replay(hidden), *layers[start:]])
        return max(score(model, ref)["kl"], 0.0)
    finally:
        model.model.layers = layers
        for p, w in saved.items():
            model.get_submodule(p).weight.data = w


def measure_profile(
    base: torch.nn.Module,
    arch: Arch,
    space: SearchSpace,
    stats: Stats,
    ref: Reference,
    context_tokens: int,
    log=print,
    cache: VariantCache | None = None,
) -> Profile:
    """Measure the damage model: per-group errors from the weights, one probe pass per group.

    The token table's options and the probes' weights are made through `cache`, under the keys the trials
    use: with the trials' variant store behind it, what the search made before (the uniform baselines'
    variants) is read, and what the profile makes no trial makes again. (Under error compensation the trials'
    linears differ from the probes' uncompensated ones, so the probes make theirs apart.)"""
    cache = cache or VariantCache(max_bytes=0)
    probes = cache if compensation_of(stats) is None else VariantCache(max_bytes=0)
    n, t = min(PROBE_SEQS, ref.batch.shape[0]), min(PROBE_LEN, ref.batch.shape[1])
    # The base's top-k at the first t positions do not depend on later tokens: a causal model.
    ref = Reference(ref.batch[:n, :t], ref.topk_logp[:n, : t - 1], ref.topk_idx[:n, : t - 1], ref.perplexity)
    hidden = _block_inputs(base, ref.batch)
    groups = []
    tty, every, started = sys.stdout.isatty(), max(1, arch.n_layers // 5), time.perf_counter()
    for i, block in enumerate(base.model.layers):
        errs = _Errors(block, i, stats)
        for kind, _ in SUBLAYERS:
            groups.append(
                _group_profile(base, ref, block, i, kind, arch, space, stats, hidden[i], probes, errs, context_tokens)
            )
        if tty or (i + 1) % every == 0 or i + 1 == arch.n_layers:  # a log file gets a line per fifth
            done = f"  sensitivity: block {i + 1}/{arch.n_layers}, {time.perf_counter() - started:.0f} s"
            log(done, end="\r" if tty else "\n", flush=True)
    if tty:
        log("")
    embed = _embed_profile(base, arch, space, ref, stats, cache)
    # Block norms belong to their group (a removed sublayer drops its norm); the final norm is fixed.
    fixed = sum(t.nbytes for t in deployed_tensors(arch, Plan()) if t.name == "output_norm.weight")
    return Profile(groups, embed, fixed)


def _group_profile(base, ref, block, i, kind, arch, space, stats, hidden, probes, errs, context_tokens) -> GroupProfile:
    """Block `i`'s `kind` group: its options, their bytes and predicted damage. In a kind the space searches per
    tensor, each linear takes its own type and its own gain (a probe of it alone at its most damaging type)."""
    name, gspace, linears = f"blk.{i}.{kind}", getattr(space, kind), dict(SUBLAYERS)[kind]
    options = _options(gspace)
    choices = [c for _, c in options]
    parts = [_group_errors(block, i, kind, arch, stats, c, errs) for c in choices]
    if kind in space.per_tensor and len(gspace.quant) > 1:
        # Only pruning's gain from the group's probes (quantization's comes per linear).
        _, g_prune = _gains(
            base, ref, block, i, kind, arch, choices, [(0.0, p) for _, p in parts], linears, stats, hidden, probes
        )
        gains = {}
        for tensor, path in linears:
            alone = [(errs.linear(tensor, path, c), 0.0) for c in choices]
            gains[tensor] = _gains(
                base, ref, block, i, kind, arch, choices, alone, [(tensor, path)], stats, hidden, probes
            )[0]
        shares = [p for _, p in parts]
        sized = lambda c: _group_bytes(arch, name, c, context_tokens)  # noqa: E731
        return GroupProfile(name, *tensor_options(i, kind, arch, options, shares, gains, g_prune, errs.linear, sized))
    g_quant, g_prune = _gains(base, ref, block, i, kind, arch, choices, parts, linears, stats, hidden, probes)
    return GroupProfile(
        name,
        [params for params, _ in options],
        [_group_bytes(arch, name, c, context_tokens) for c in choices],
        [g_quant * q + g_prune * p for q, p in parts],
    )


def _fast_to_quantize(block, i: int, linears, choice: LayerChoice) -> bool:
    """Whether the choice stores plain matrices in legacy block types (no K-quant scale search)."""
    for name, path in linears:
        w = block.get_submodule(path).weight
        deploy = deploy_linear(f"blk.{i}.{name}", w.shape[0], w.shape[1], choice)
        if not deploy.form.plain or any(t.type.endswith("_K") or t.type.startswith("TQ") for t in deploy.tensors):
            return False
    return True


def _unpruned(choice: LayerChoice) -> bool:
    return all(op.is_neutral(choice) for op in PRUNING.values())


def _gains(base, ref, block, i, kind, arch, choices, parts, linears, stats, hidden, cache) -> tuple[float, float]:
    """KL per unit of relative output error of one group, (quantization's, pruning's), from a probe pass each.

    Quantization's probe is the group's most damaging unpruned option; pruning's, its most damaging pruning
    with everything else at neutral. They differ: where a block writes a massive activation (SmolLM2's
    layer-11 FFN), that one output channel holds nearly all the output's energy, quantization errs mostly
    along it (which the next norm divides away) and pruning along the others, so one gain for both called
    pruning that FFN by a quarter free (predicted KL 1e-5; measured with it, about 0.07). A group with only
    one kind of option uses its gain for both.
    """
    quant = [q for q, _ in parts]
    shares = [p for _, p in parts]
    unpruned = [k for k, c in enumerate(choices) if _unpruned(c) and quant[k] > 0]
    g_quant = g_prune = None
    if unpruned:
        k = max(unpruned, key=lambda k: quant[k])
        # Legacy block types quantize far faster than K-quants (whose scale search is costly): take one when
        # its error is within 4x of the largest.
        fast = [j for j in unpruned if _fast_to_quantize(block, i, linears, choices[j]) and quant[j] >= quant[k] / 4]
        k = max(fast, key=lambda j: quant[j]) if fast else k
        swaps = _dense_swaps(block, i, linears, choices[k], stats, cache)
        g_quant = _probe(base, ref, swaps, i, hidden) / quant[k]
    if max(shares, default=0.0) > 0:
        k = max(range(len(choices)), key=lambda k: shares[k])
        # Everything but the pruning back at neutral: the probe measures the pruning alone.
        c = choices[k].model_copy(
            update={f.name: f.neutral for op in REGISTRY if not isinstance(op, Pruning) for f in op.fields}
        )
        op = PRUNING[kind]
        swaps = op.probe_swaps(block, i, arch, op.kept(arch, c), stats)
        g_prune = _probe(base, ref, swaps, i, hidden) / max(shares[k], 1e-12)
    if g_quant is None and g_prune is None:
        return 0.0, 0.0
    return (g_prune if g_quant is None else g_quant), (g_quant if g_prune is None else g_prune)


def _dense_swaps(block, i: int, linears, choice: LayerChoice, stats: Stats, cache: VariantCache) -> dict:
    """The weights of block `i`'s `linears` as `choice` deploys them (module path -> float matrix)."""
    device = weight_of(block, linears[0][1]).device
    return {
        f"model.layers.{i}.{path}": dense(linear_variant(cache, block, i, name, path, choice, stats), device)
        for name, path in linears
    }


def _embed_profile(
    base: torch.nn.Module, arch: Arch, space: SearchSpace, ref: Reference, stats: Stats, cache: VariantCache
) -> GroupProfile:
    """Every embedding option measured directly (it is also the output head when tied)."""
    device = base.model.embed_tokens.weight.device
    options, nbytes, damage = [], [], []
    for q in space.embed_quant:
        deq = dequantize(table_variant(cache, "token_embd", base, q, arch, stats).parts["weight"], device)
        damage.append(_probe(base, ref, {"model.embed_tokens": deq}))
        plan = Plan(embed_quant=q)
        tables = ("token_embd.weight", "output.weight")
        nbytes.append(sum(x.nbytes for x in deployed_tensors(arch, plan) if x.name in tables))
        options.append({"embed_quant": q} if len(space.embed_quant) > 1 else {})
    return GroupProfile("embed", options, nbytes, damage)


def cached_profile(
    base,
    arch: Arch,
    space: SearchSpace,
    stats: Stats,
    ref: Reference,
    context_tokens: int,
    key: str,
    cache_dir: Path,
    variants: VariantCache | None = None,
) -> Profile:
    """`measure_profile` (its tables made through `variants`), read from `cache_dir` when the same model, data
    and space were measured before."""
    digest = content_key(f"{key}|{space.model_dump_json()}|{context_tokens}|{VERSION}", ref.batch.numpy().tobytes())
    path = Path(cache_dir) / f"sensitivity-{digest}.json"
    if path.exists():
        profile = Profile.from_json(path.read_text())
        if profile is not None:
            return profile
    print("measuring per-group sensitivity (once per model, calibration set and space) ...", flush=True)
    profile = measure_profile(base, arch, space, stats, ref, context_tokens, cache=variants)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, profile.to_json())
    return profile
