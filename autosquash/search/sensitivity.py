"""Plans from the damage model (search/profile.py), and the Optuna sampler that proposes them.

For a memory budget, the plan of least predicted damage that fits (a multiple-choice knapsack: a Lagrangian sweep,
then greedy upgrades into what is left). The sampler first proposes one plan at each uniform baseline's size (the
plans a search must beat) and at sizes between them, then mutates plans of the front found so far, repairing each
mutation back under its size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import replace

import optuna

from autosquash.search.profile import GroupProfile, Profile
from autosquash.search.space import params_key

TARGET = "sensitivity_target"  # trial user attribute: index of the target size a proposal was made for


def best_under(profile: Profile, budget: int) -> tuple[list[int], int] | None:
    """The options of least predicted damage whose total size is at most `budget` (None if nothing fits)."""
    return best_in_band(profile, budget, 0)


def best_in_band(profile: Profile, budget: int, floor: int) -> tuple[list[int], int] | None:
    """The options of least predicted damage among plans in [floor, budget]; where none lands there, those of
    `best_under(budget)` (None if nothing fits).

    The token table is one tensor, often a fifth of the model, whose types step by megabytes, so each of its
    types is planned for on its own: a knapsack of the groups with the table fixed. The band makes a trial
    measure what the damage model says of the sizes above a cheaper table's plan rather than assume it.
    """
    plans = []
    for e in range(len(profile.embed.nbytes)):
        one = replace(
            profile,
            embed=GroupProfile(
                profile.embed.name, *([getattr(profile.embed, f)[e]] for f in ("options", "nbytes", "damage"))
            ),
        )
        picks = _knapsack(one, budget)
        if picks is not None:
            plans.append((one.size(*picks) < floor, one.damage(*picks), one.size(*picks), picks[0], e))
    return min(plans)[3:] if plans else None


def _knapsack(profile: Profile, budget: int) -> tuple[list[int], int] | None:
    """Near-least predicted damage within `budget`: a Lagrangian sweep (each part minimises damage + λ·bytes)
    finds the hull plan just under the budget; greedy upgrades (best damage saved per byte) then spend what
    is left."""
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
    of the front. Enqueued trials (the uniform baselines) keep their fixed parameters. With `band` (bytes), the
    plan proposed at a target lands within `band` of it where one can (`best_in_band`)."""

    def __init__(self, profile: Profile, targets: list[int], seed: int = 0, mutations: int = 3, band: int = 0):
        if band:
            # Targets where the damage model's best plan lands within the band come first; those where a smaller
            # plan is predicted better (their band plans measure that claim) after them, so a search that stops
            # early still covers the sizes the front is predicted to hold.
            def predicted_there(t: int) -> bool:
                found = best_under(profile, t)
                return found is not None and profile.size(*found) >= t - band

            targets = sorted(targets, key=lambda t: not predicted_there(t))
        self.profile, self.targets, self.mutations, self.band = profile, targets, mutations, band
        self._rng = random.Random(seed)
        self._plans: dict[int, dict[str, object]] = {}
        self._attrs: dict[int, dict[str, object]] = {}

    # Optuna's sampler interface: every parameter comes from the plan chosen when the trial starts.
    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def trial_attrs(self, number: int) -> dict[str, object]:
        """What the search stores on trial `number` as it starts: its origin (proposed or mutated) and, for a
        proposal, the index of its target size (which later proposals read to go on from)."""
        return self._attrs.get(number, {})

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "fixed_params" in trial.system_attrs:  # an enqueued trial (a baseline, a retried plan)
            return
        trials = study.get_trials(deepcopy=False)
        seen = {params_key(t.params) for t in trials if t.params}
        used = [t.user_attrs[TARGET] for t in trials if TARGET in t.user_attrs]
        n, params = (max(used) + 1 if used else 0), None
        while n < len(self.targets) and params is None:
            target = self.targets[n]
            found = best_in_band(self.profile, target, target - self.band if self.band else 0)
            if found is not None and params_key(self.profile.params(*found)) not in seen:
                params = self.profile.params(*found)
            else:
                n += 1
        attrs: dict[str, object] = {"origin": "proposed", TARGET: n}
        if params is None:
            attrs = {"origin": "mutated"}
            for _ in range(50):  # a plan not tried yet, if one is found
                params = self._mutate(study)
                if params_key(params) not in seen:
                    break
        self._attrs[trial.number] = attrs
        self._plans[trial.number] = params

    def sample_independent(self, study, trial, param_name, param_distribution):
        params = self._plans.get(trial.number, {})
        choices = getattr(param_distribution, "choices", ())
        if param_name in params and params[param_name] in choices:
            return params[param_name]
        return optuna.samplers.RandomSampler(seed=self._rng.randrange(2**31)).sample_independent(
            study, trial, param_name, param_distribution
        )

    def after_trial(self, study, trial, state, values) -> None:
        self._plans.pop(trial.number, None)
        self._attrs.pop(trial.number, None)

    def _mutate(self, study: optuna.Study) -> dict[str, object]:
        """A front plan with a few groups moved to other options, then repaired to fit its old size."""
        front = study.best_trials
        if not front:
            found = best_under(self.profile, max(self.targets)) if self.targets else None
            return self.profile.params(*found) if found else {}
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


def proposal_targets(profile: Profile, baseline_sizes: list[int], step: int | None = None) -> list[int]:
    """Sizes to propose at: each uniform baseline's within the range (smallest first), the range's ends, then
    sizes that split the widest remaining gap until no two neighbours are more than `step` apart.

    The range runs from the smallest plan to the smallest one whose predicted damage is within a thousandth of
    the range's damage of the least (lossless, to the damage model: a larger plan cannot be much better). Gaps
    are split widest first, so a search that stops early still covers the range evenly. `step` (bytes; default
    a twentieth of the range) is the widest gap the front may keep: the question "the best model of at most
    X MB" needs a plan near every X.
    """
    smallest = profile.size(*_smallest(profile))
    top = _lossless_size(profile, smallest)
    step = step or max(1, (top - smallest) // 20)
    inside = sorted({s for s in baseline_sizes if smallest <= s <= top})
    targets = [*inside, *(s for s in (smallest, top) if s not in inside)]
    points = sorted(targets)
    while True:
        gap, a = max(((b - a, a) for a, b in itertools.pairwise(points)), default=(0, 0))
        if gap <= step:
            return targets
        mid = a + gap // 2
        targets.append(mid)
        bisect.insort(points, mid)


def _lossless_size(profile: Profile, smallest: int) -> int:
    """The least budget whose best plan's predicted damage is within 0.1 % of the damage range of the least."""

    def best(g: GroupProfile) -> int:
        return min(range(len(g.nbytes)), key=lambda k: (g.damage[k], g.nbytes[k]))

    least = [best(g) for g in profile.groups], best(profile.embed)
    hi, floor = profile.size(*least), profile.damage(*least)
    worst = profile.damage(*_smallest(profile))
    enough = floor + 1e-3 * max(worst - floor, 0.0)
    lo = smallest
    while hi - lo > max(1, (hi - smallest) // 1000):
        mid = (lo + hi) // 2
        found = best_under(profile, mid)
        if found is not None and profile.damage(*found) <= enough:
            hi = mid
        else:
            lo = mid
    return hi


def _smallest(profile: Profile) -> tuple[list[int], int]:
    pick = [min(range(len(g.nbytes)), key=lambda k: g.nbytes[k]) for g in profile.groups]
    return pick, min(range(len(profile.embed.nbytes)), key=lambda k: profile.embed.nbytes[k])
