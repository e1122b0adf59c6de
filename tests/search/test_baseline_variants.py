"""The uniform baselines' layers, made once before the profile and the trials: the trials and the profile's
probes read them from the variant store, and what a trial scores is what it would have made itself."""

import dataclasses
from pathlib import Path

import optuna
import pytest
import yaml

from autosquash.compress.apply import VariantCache
from autosquash.evaluate.heal import HealConfig
from autosquash.search.experiment import load_experiment
from autosquash.search.profile import measure_profile
from autosquash.search.space import SearchSpace
from autosquash.search.study import make_baseline_variants
from autosquash.search.trial import evaluate_plan, load_inputs, open_store, prepare_context

ROOT = Path(__file__).parents[2]


@pytest.fixture
def searched(tmp_path):
    experiment = {
        "name": "baseline-layers",
        "model": str(ROOT / "experiments/tiny-llama.json"),
        "phone": "iphone-16",
        "search_space": str(ROOT / "search_spaces/gguf-mixed.yaml"),
        "context_tokens": 512,
        "calibration": {"source": "wikipedia", "tokens": 512, "seq_len": 128},
        "evaluation": {"source": "lambada", "tokens": 256, "seq_len": 128},
        "topk": 16,
        "heal": {"steps": 0},
    }
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    exp = load_experiment(tmp_path / "experiment.yaml")
    ctx = prepare_context(exp, load_inputs(exp, tmp_path / "run"), workers=1)
    ctx = dataclasses.replace(ctx, heal=HealConfig(steps=0))
    space = SearchSpace.load(exp.search_space)
    study = optuna.create_study(directions=["minimize"] * 3)
    for quant in space.baselines:  # as the search enqueues them
        study.enqueue_trial(space.baseline_params(ctx.arch, quant), user_attrs={"origin": "baseline"})
    plans = [
        space.sample(optuna.trial.FixedTrial(space.baseline_params(ctx.arch, q)), ctx.arch) for q in space.baselines
    ]
    return ctx, space, study, plans


def _silent(*args, **kwargs):
    pass


def test_a_baseline_trial_reads_every_layer_the_search_made_before_it(searched):
    ctx, space, study, plans = searched
    assert make_baseline_variants(study, space, ctx, budget=3, log=_silent) == 3
    for k, plan in enumerate(plans[:4]):
        cache = VariantCache(store=open_store(ctx))
        read = evaluate_plan(ctx, plan, 0, cache)
        made = evaluate_plan(ctx, plan, 0, VariantCache(max_bytes=0))  # no store: every layer made here
        assert read["kl"] == made["kl"] and read["perplexity"] == made["perplexity"]
        if k < 3:
            assert cache.misses == 0 and cache.stored_hits > 0, space.baselines[k]
        else:  # beyond the budget: the trial makes its own
            assert cache.misses > 0


def test_the_profile_probes_make_no_weight_a_baseline_made(searched):
    ctx, space, study, _ = searched
    assert make_baseline_variants(study, space, ctx, budget=len(space.baselines), log=_silent) == 10
    cache = VariantCache(max_bytes=0, store=open_store(ctx))
    measure_profile(ctx.base, ctx.arch, space, ctx.stats, ctx.calib_ref, 512, log=_silent, cache=cache)
    # Every group's quantization probe is a unpruned baseline type: only the table options beyond the
    # baselines' (the space's first) are made.
    assert cache.misses == len(space.embed_quant) - 1 and cache.stored_hits > 0


def test_nothing_is_made_without_a_store(searched):
    ctx, space, study, _ = searched
    assert make_baseline_variants(study, space, dataclasses.replace(ctx, variant_store=None), 10, _silent) == 0
