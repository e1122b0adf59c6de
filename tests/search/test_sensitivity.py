import bisect
import itertools
import random
from dataclasses import replace

import optuna
import pytest
import torch

from autosquash.compress.apply import compress
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.cost.model import kv_cache_bytes_per_token
from autosquash.evaluate.proxy import reference, score
from autosquash.search.profile import GroupProfile, Profile, measure_profile
from autosquash.search.sensitivity import TARGET, SensitivitySampler, best_in_band, best_under, proposal_targets
from autosquash.search.space import SearchSpace

SPACE = SearchSpace.model_validate(
    {
        "name": "t",
        "target": "gguf",
        "embed_quant": ["Q8_0", "Q4_0"],
        "attn": {"quant": ["Q8_0", "Q4_0", "Q2_K"]},
        "ffn": {"quant": ["Q8_0", "Q4_0", "Q2_K"], "ffn_keep_ratio": [1.0, 0.5]},
        "baselines": ["Q8_0", "Q4_0", "Q2_K"],
    }
)
CONTEXT = 64


@pytest.fixture(scope="module")
def measured():
    from transformers import LlamaForCausalLM

    from autosquash.models.arch import Arch
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    arch = Arch.from_config(model.config)
    batch = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, batch)
    ref = reference(model, batch, 16)
    profile = measure_profile(model, arch, SPACE, stats, ref, CONTEXT, log=lambda *a, **k: None)
    return model, arch, stats, ref, profile


def test_sizes_are_what_the_plan_deploys(measured):
    _, arch, _, _, profile = measured
    for quant in SPACE.baselines:
        params = SPACE.baseline_params(arch, quant)
        plan = Plan.uniform(arch, quant, embed_quant="Q8_0")
        weights = sum(t.nbytes for t in deployed_tensors(arch, plan))
        kv = kv_cache_bytes_per_token(arch) * CONTEXT
        assert profile.size(*profile.picks_of(params)) == weights + kv


def test_damage_grows_as_bits_shrink_and_channels_go(measured):
    _, _, _, _, profile = measured
    for g in profile.groups:
        by = {tuple(sorted(o.items())): d for o, d in zip(g.options, g.damage, strict=True)}
        key = (lambda q, r=1.0: (("ffn_keep_ratio", r), ("quant", q))) if g.name.endswith("ffn") else None
        if key is None:
            assert by[(("quant", "Q8_0"),)] < by[(("quant", "Q4_0"),)] < by[(("quant", "Q2_K"),)]
        else:
            assert by[key("Q8_0")] < by[key("Q4_0")] < by[key("Q2_K")]
            assert by[key("Q8_0")] < by[key("Q8_0", 0.5)]
    assert profile.embed.damage[0] < profile.embed.damage[1]  # Q8_0 embeddings hurt less than Q4_0


def test_pruning_and_quantization_each_take_the_gain_their_own_probe_measured(measured, monkeypatch):
    """A pruning probe swaps in down_proj alone, a quantization probe every linear of the group; each option's
    damage is its quantization error at the one gain plus its pruned share at the other (SmolLM2's layer-11
    FFN, where one gain for both called pruning free, is the case)."""
    from autosquash.search import profile as profile_module

    model, arch, stats, ref, _ = measured
    monkeypatch.setattr(profile_module, "_probe", lambda _m, _r, swaps, *a: 1.0 if len(swaps) == 1 else 0.01)
    profile = measure_profile(model, arch, SPACE, stats, ref, CONTEXT, log=lambda *a, **k: None)
    block = model.model.layers[0]
    errs = profile_module._Errors(block, 0, stats)
    ffn = next(g for g in profile.groups if g.name == "blk.0.ffn")
    choices = [c for _, c in profile_module._options(SPACE.ffn)]
    parts = [profile_module._group_errors(block, 0, "ffn", arch, stats, c, errs) for c in choices]
    worst_quant = max(q for (q, p), c in zip(parts, choices, strict=True) if c.ffn_keep_ratio == 1.0)
    worst_share = max(p for _, p in parts)
    for (q, p), damage in zip(parts, ffn.damage, strict=True):
        assert damage == pytest.approx(0.01 * q / worst_quant + 1.0 * p / worst_share)
    assert max(d for (q, p), d in zip(parts, ffn.damage, strict=True) if p > 0) > 0.9  # pruning at its own gain


def test_predicted_damage_ranks_plans_as_measured(measured):
    """The additive model's order of random plans agrees with their measured KL (rank correlation)."""
    from scipy.stats import spearmanr

    model, arch, stats, ref, profile = measured
    rng = random.Random(0)
    predicted, measured_kl = [], []
    for _ in range(8):
        picks = [rng.randrange(len(g.nbytes)) for g in profile.groups]
        embed = rng.randrange(len(profile.embed.nbytes))
        params = profile.params(picks, embed)
        trial = optuna.trial.FixedTrial(params)
        plan = SPACE.sample(trial, arch)
        predicted.append(profile.damage(picks, embed))
        measured_kl.append(score(compress(model, arch, plan, stats), ref)["kl"])
    assert spearmanr(predicted, measured_kl).statistic > 0.6


def _random_profile(rng: random.Random, n_groups: int, n_options: int) -> Profile:
    def part(name):
        nbytes = sorted(rng.randrange(10, 100) for _ in range(n_options))
        damage = sorted((rng.random() for _ in range(n_options)), reverse=True)
        return GroupProfile(name, [{"o": k} for k in range(n_options)], nbytes, damage)

    return Profile([part(f"g{i}") for i in range(n_groups)], part("embed"), fixed_bytes=5)


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_fits_the_budget_and_is_near_the_exact_optimum(seed):
    rng = random.Random(seed)
    profile = _random_profile(rng, 4, 3)
    parts = [*profile.groups, profile.embed]
    for budget in (60, 150, 250, 400):
        exact = None
        for picks in itertools.product(range(3), repeat=len(parts)):
            size = profile.fixed_bytes + sum(p.nbytes[k] for p, k in zip(parts, picks, strict=True))
            dmg = sum(p.damage[k] for p, k in zip(parts, picks, strict=True))
            if size <= budget and (exact is None or dmg < exact):
                exact = dmg
        found = best_under(profile, budget)
        if exact is None:
            assert found is None
            continue
        assert profile.size(*found) <= budget
        # Lagrangian + greedy is not exact for a multiple-choice knapsack, but close on small cases.
        assert profile.damage(*found) <= exact + 0.25


def _lumpy_table_profile() -> Profile:
    """SmolLM2's shape in small: a token table whose cheaper type saves 9 bytes for 0.015 of damage, and ten
    groups that each save 1 byte for 0.004 (and their last byte for 0.010 more)."""
    group = GroupProfile("g", [{"q": "hi"}, {"q": "mid"}, {"q": "lo"}], [10, 9, 8], [0.0, 0.004, 0.014])
    table = GroupProfile("embed", [{"t": "Q8_0"}, {"t": "Q5_1"}], [30, 21], [0.0, 0.015])
    return Profile([replace(group, name=f"g{i}") for i in range(10)], table, fixed_bytes=0)


def test_a_plan_keeps_the_larger_table_where_shrinking_groups_costs_less():
    profile = _lumpy_table_profile()
    # 128 bytes: the larger table with two groups a byte smaller (0.008) beats the cheaper table (0.015),
    # which one Lagrangian sweep over every part misses (the table's step is wider than what it leaves).
    picks, table = best_under(profile, 128)
    assert profile.embed.options[table] == {"t": "Q8_0"} and profile.damage(picks, table) == pytest.approx(0.008)
    picks, table = best_under(profile, 125)  # five groups smaller (0.020): now the cheaper table wins
    assert profile.embed.options[table] == {"t": "Q5_1"} and profile.size(picks, table) == 121


def test_a_band_proposes_a_plan_near_its_target_even_where_a_smaller_one_is_predicted_better():
    profile = _lumpy_table_profile()
    # Under 125 bytes the cheaper table's plan (121 bytes) is predicted best; the band [124, 125] asks for the
    # best plan that lands there instead, so that a trial measures what the damage model only predicts.
    picks, table = best_in_band(profile, 125, 124)
    assert profile.size(picks, table) == 125 and profile.damage(picks, table) == pytest.approx(0.020)
    assert best_in_band(profile, 125, 200) == best_under(profile, 125)  # nothing in the band: the best under
    assert best_in_band(profile, 50, 40) is None  # nothing fits


def test_targets_the_damage_model_calls_dominated_are_proposed_last():
    profile = _lumpy_table_profile()
    # Under 125 the best plan is 121 bytes: 125's band plan (124-125) only tests the damage model, so it waits.
    sampler = SensitivitySampler(profile, [125, 128, 121, 110], band=1)
    assert sampler.targets == [128, 121, 110, 125]
    assert SensitivitySampler(profile, [125, 128, 121, 110]).targets == [125, 128, 121, 110]  # no band: as given


@pytest.mark.parametrize("seed", range(3))
def test_targets_cover_the_range_with_no_gap_wider_than_the_step_widest_first(seed):
    from autosquash.search.sensitivity import _smallest

    profile = _random_profile(random.Random(seed), 6, 4)
    smallest = profile.size(*_smallest(profile))
    step = 7
    targets = proposal_targets(profile, [smallest + 40, 10**9], step)
    points = sorted(targets)
    assert points[0] == smallest and smallest + 40 in targets and 10**9 not in targets  # baselines outside: none
    assert max(b - a for a, b in itertools.pairwise(points)) <= step
    # The top is (nearly) lossless: no larger budget predicts clearly less damage.
    top = best_under(profile, points[-1])
    floor = min(profile.damage(*best_under(profile, b)) for b in range(points[-1], points[-1] + 500))
    assert profile.damage(*top) <= floor + 1e-3 * (profile.damage(*_smallest(profile)) - floor) + 1e-12
    # Widest gap first: after the ends and the baseline, each new target halves a widest gap.
    seen = sorted(targets[:3])
    for t in targets[3:]:
        widest = max(b - a for a, b in itertools.pairwise(seen))
        left = max(a for a in seen if a < t)
        right = min(b for b in seen if b > t)
        assert right - left == widest
        bisect.insort(seen, t)


def test_sampler_proposes_under_each_target_then_mutates(measured):
    _, arch, _, _, profile = measured
    sizes = [profile.size(*profile.picks_of(SPACE.baseline_params(arch, b))) for b in SPACE.baselines]
    targets = proposal_targets(profile, sizes)
    inside = sorted({s for s in sizes if min(targets) <= s <= max(targets)})
    assert targets[: len(inside)] == inside  # each baseline in the range has a proposal at its size first
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=SensitivitySampler(profile, targets))
    study.enqueue_trial(SPACE.baseline_params(arch, "Q8_0"), user_attrs={"origin": "baseline"})
    kinds, seen = [], set()
    for _ in range(len(targets) + 4):
        trial = study.ask()
        SPACE.sample(trial, arch)
        attrs = {"origin": trial.user_attrs.get("origin"), **study.sampler.trial_attrs(trial.number)}
        kinds.append(attrs["origin"])
        picks = profile.picks_of(trial.params)
        if kinds[-1] == "proposed":
            assert profile.size(*picks) <= targets[attrs[TARGET]]
        for k, v in attrs.items():  # as the search stores them, for the sampler's next proposal
            trial.set_user_attr(k, v)
        key = tuple(sorted(trial.params.items()))
        assert key not in seen  # never the same plan twice
        seen.add(key)
        study.tell(trial, [profile.damage(*picks), profile.size(*picks)])
    assert kinds[0] == "baseline"
    assert "proposed" in kinds and kinds[-1] == "mutated"


def test_proposals_beat_the_uniform_plan_of_their_size(measured):
    """At each baseline's size the proposal's measured KL is no worse than the baseline's."""
    model, arch, stats, ref, profile = measured
    for quant in ("Q4_0", "Q2_K"):
        base_params = SPACE.baseline_params(arch, quant)
        found = best_under(profile, profile.size(*profile.picks_of(base_params)))
        kl = {}
        for name, params in (("baseline", base_params), ("proposal", profile.params(*found))):
            plan = SPACE.sample(optuna.trial.FixedTrial(params), arch)
            kl[name] = score(compress(model, arch, plan, stats), ref)["kl"]
        assert kl["proposal"] <= kl["baseline"] * 1.05, (quant, kl)


def test_pruning_probes_leave_the_base_model_as_it_was():
    """With nothing but pruning to probe (F16 everywhere), the probes zero the pruned channels of a copy:
    the base model a search then ships to its trials is untouched."""
    from transformers import LlamaForCausalLM

    from autosquash.models.arch import Arch
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arch = Arch.from_config(model.config)
    space = SearchSpace.model_validate(
        {
            "name": "prune-only",
            "target": "gguf",
            "embed_quant": ["F16"],
            "attn": {"quant": ["F16"], "attn_keep_ratio": [1.0, 0.5]},
            "ffn": {"quant": ["F16"], "ffn_keep_ratio": [1.0, 0.5]},
            "baselines": ["F16"],
        }
    )
    batch = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, batch)
    profile = measure_profile(model, arch, space, stats, reference(model, batch, 16), CONTEXT, log=lambda *a, **k: None)
    assert any(max(g.damage) > 0 for g in profile.groups)  # the probes ran
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2", "gp", "sensitivity"])
def test_a_resumed_search_proposes_no_plan_it_has_evaluated(measured, name):
    """A stop after 6 trials and a resume (the sampler re-created, as `--resume` re-creates it, with its seed
    offset by the stored trials) to 12: every evaluated plan is new, whatever the sampler."""
    from autosquash.search.experiment import Experiment
    from autosquash.search.record import ask_new
    from autosquash.search.samplers import make_sampler
    from autosquash.search.space import params_key

    _, arch, _, _, profile = measured
    exp = Experiment(name="x", model="m", phone="d", search_space="s", sampler=name, seed=0)
    sizes = [profile.size(*profile.picks_of(SPACE.baseline_params(arch, b))) for b in SPACE.baselines]

    def sampler(offset: int):
        if name == "sensitivity":
            return SensitivitySampler(profile, proposal_targets(profile, sizes), seed=offset)
        return make_sampler(exp, 12, offset=offset)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler(0))
    for b in SPACE.baselines:
        study.enqueue_trial(SPACE.baseline_params(arch, b), user_attrs={"origin": "baseline"})
    for stop in (6, 12):
        if stop == 12:
            study.sampler = sampler(len(study.trials))  # the resume
        while len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < stop:
            trial, plan = ask_new(study, SPACE, arch, [])
            picks = profile.picks_of(trial.params)
            study.tell(trial, [profile.damage(*picks), profile.size(*picks)])
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 12 and len({params_key(t.params) for t in done}) == 12


def test_the_tables_the_profile_quantizes_are_what_the_trials_read(measured, tmp_path, monkeypatch):
    """The profile makes each token-table option through the trials' variant store; a trial of that plan
    then reads the table from the store (made nowhere else) and deploys exactly the bytes the profile measured."""
    from autosquash.compress import apply
    from autosquash.compress.store import VariantStore

    model, arch, stats, ref, profile = measured
    store = VariantStore(tmp_path, 1 << 30)
    again = measure_profile(
        model, arch, SPACE, stats, ref, CONTEXT, log=lambda *a, **k: None, cache=apply.VariantCache(0, store)
    )
    assert again.embed.damage == profile.embed.damage
    made = {q: apply.quantized_table(model, arch, "token_embd", q, stats) for q in SPACE.embed_quant}

    def not_again(*args):
        raise AssertionError(f"a trial quantized a table the profile had made: {args[2:4]}")

    monkeypatch.setattr(apply, "quantized_table", not_again)
    for q in SPACE.embed_quant:
        trial = apply.VariantCache(store=store)
        apply.compress(model, arch, Plan.uniform(arch, "Q8_0", embed_quant=q), stats, trial)
        read = trial.get(("token_embd", q), not_again).parts["weight"]
        assert read.type == q and read.data.tobytes() == made[q].data.tobytes()


def test_per_tensor_options_price_and_predict_each_linear_alone(measured, monkeypatch):
    from autosquash.search import profile as profile_module

    model, arch, stats, ref, _ = measured
    space = SPACE.model_copy(update={"per_tensor": ["attn", "ffn"]})
    probed, real = [], profile_module._probe

    def probe(m, r, swaps, *a):
        probed.append(sorted(swaps))
        return real(m, r, swaps, *a)

    monkeypatch.setattr(profile_module, "_probe", probe)
    profile = measure_profile(model, arch, space, stats, ref, CONTEXT, log=lambda *a, **k: None)
    assert ["model.layers.0.self_attn.v_proj"] in probed and ["model.layers.1.mlp.down_proj"] in probed
    for quant in space.baselines:  # the uniform plans stay among the options, sized as deployed
        plan = Plan.uniform(arch, quant, embed_quant="Q8_0")
        picks = profile.picks_of(space.baseline_params(arch, quant))
        assert (
            profile.size(*picks)
            == sum(t.nbytes for t in deployed_tensors(arch, plan)) + kv_cache_bytes_per_token(arch) * CONTEXT
        )
    rng = random.Random(0)
    mixed = 0
    for _ in range(6):
        picks = [rng.randrange(len(g.nbytes)) for g in profile.groups]
        plan = space.sample(optuna.trial.FixedTrial(profile.params(picks, 0)), arch)
        mixed += sum(bool(c.tensor_quant) for c in plan.groups.values())
        kv = kv_cache_bytes_per_token(arch, kv_heads_per_layer=[arch.n_kv_heads] * arch.n_layers) * CONTEXT
        assert profile.size(picks, 0) == sum(t.nbytes for t in deployed_tensors(arch, plan)) + kv
    assert mixed
    for g in profile.groups:  # per pruning setting, no option is beaten on bytes and damage but a uniform one
        for k, (o, b, d) in enumerate(zip(g.options, g.nbytes, g.damage, strict=True)):
            if len({v for f, v in o.items() if f.endswith(".quant")}) > 1:
                rest = {f: v for f, v in o.items() if not f.endswith(".quant")}
                others = [
                    (b2, d2)
                    for o2, b2, d2 in zip(g.options, g.nbytes, g.damage, strict=True)
                    if {f: v for f, v in o2.items() if not f.endswith(".quant")} == rest
                ]
                assert not any(b2 <= b and d2 < d - 1e-12 for b2, d2 in others), (g.name, k)
