"""A group's options when each of its linears takes its own type (a search space's `per_tensor` kinds).

Ten types on four attention linears make 10,000 combinations a group; the damage model sums each linear's damage
alone, so for every setting of the group's other fields (its pruning) only the combinations that no other beats on
both bytes and predicted damage can be the knapsack's best, and they are found linear by linear (a Pareto merge)
without listing the rest. The uniform combinations (every linear in one type: the baselines) are kept beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from autosquash.compress.plan import SUBLAYERS, LayerChoice, sublayer_tensors
from autosquash.models.arch import Arch

Option = tuple[tuple[int, ...], int, float]  # one option index per part, summed bytes, summed damage


def pareto_sums(parts: list[list[tuple[int, float]]], keep: list[tuple[int, ...]] = ()) -> list[Option]:
    """The combinations of one (bytes, damage) option per part that no other combination beats (as many bytes or
    fewer and less damage), smallest first, then those of `keep` (index tuples) not among them."""
    front: list[Option] = [((), 0, 0.0)]
    for options in parts:
        merged = [(p + (k,), b + nb, d + nd) for p, b, d in front for k, (nb, nd) in enumerate(options)]
        merged.sort(key=lambda o: (o[1], o[2]))
        front, least = [], float("inf")
        for o in merged:
            if o[2] < least:
                front.append(o)
                least = o[2]
    have = {p for p, _, _ in front}
    for p in keep:
        if p not in have:
            front.append(
                (p, sum(parts[j][k][0] for j, k in enumerate(p)), sum(parts[j][k][1] for j, k in enumerate(p)))
            )
            have.add(p)
    return front


def _tensor_bytes(arch: Arch, i: int, kind: str, choice: LayerChoice) -> dict[str, int]:
    """Bytes of each linear block `i`'s `kind` sublayer deploys under `choice` (its bias included), by short name."""
    out = {name: 0 for name, _ in dict(SUBLAYERS)[kind]}
    for t in sublayer_tensors(arch, i, kind, choice):
        name = t.name.split(".")[2]
        if name in out:
            out[name] += t.nbytes
    return out


def tensor_options(
    i: int,
    kind: str,
    arch: Arch,
    options: list[tuple[dict, LayerChoice]],
    pruned: list[float],
    gains: dict[str, float],
    g_prune: float,
    error: Callable[[str, str, LayerChoice], float],
    group_bytes: Callable[[LayerChoice], int],
) -> tuple[list[dict], list[int], list[float]]:
    """Block `i`'s `kind` group with per-linear types: its options' parameters (`<linear>.quant` for each linear,
    the group's other searched fields as they are), bytes and predicted damage.

    `options` are the group's uniform options (params and choice, `quant` among the params), `pruned` each one's
    pruned share of output energy; a linear's damage at a type is `gains[linear]` times its relative output
    error (`error(linear, path, choice)`, measured on the unpruned weight) times the share left unpruned.
    """
    linears = dict(SUBLAYERS)[kind]
    settings: dict[str, tuple[dict, list[int]]] = {}  # the other fields' values -> the uniform options holding them
    for k, (params, _) in enumerate(options):
        rest = {f: v for f, v in params.items() if f != "quant"}
        settings.setdefault(json.dumps(rest, sort_keys=True), (rest, []))[1].append(k)
    out_params, out_bytes, out_damage = [], [], []
    for rest, ks in settings.values():
        share = pruned[ks[0]]
        sizes = [_tensor_bytes(arch, i, kind, options[k][1]) for k in ks]
        base = group_bytes(options[ks[0]][1]) - sum(sizes[0].values())  # norms, KV cache: the same for every type
        parts = [
            [(sizes[j][name], gains[name] * error(name, path, options[k][1]) * (1 - share)) for j, k in enumerate(ks)]
            for name, path in linears
        ]
        uniform = [(j,) * len(linears) for j in range(len(ks))]
        for picks, nbytes, damage in pareto_sums(parts, uniform):
            types = {f"{name}.quant": options[ks[j]][1].quant for (name, _), j in zip(linears, picks, strict=True)}
            out_params.append({**types, **rest})
            out_bytes.append(base + nbytes)
            out_damage.append(damage + g_prune * share)
    return out_params, out_bytes, out_damage
