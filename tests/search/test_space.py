import optuna
import pytest

from autosquash.errors import AutosquashError
from autosquash.search.space import SearchSpace

SPACE = {
    "name": "t",
    "target": "torch",
    "embed_quant": ["Q8_0", "Q4_0"],
    "attn": {"quant": ["Q8_0", "Q4_0"], "rank_ratio": [0.0, 0.25]},
    "ffn": {"quant": ["Q8_0", "Q4_K", "Q4_0"], "ffn_keep_ratio": [1.0, 0.5]},
    "baselines": ["Q8_0", "Q4_0"],
}


def test_sampled_plans_stay_inside_the_space(tiny_arch):
    space = SearchSpace.model_validate(SPACE)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        plan = space.sample(study.ask(), tiny_arch)
        assert len(plan.groups) == 2 * tiny_arch.n_layers
        for name, c in plan.groups.items():
            group = space.attn if name.endswith("attn") else space.ffn
            assert c.quant in group.quant and c.ffn_keep_ratio in group.ffn_keep_ratio
            assert c.rank_ratio in group.rank_ratio
        assert plan.embed_quant in space.embed_quant


def test_baseline_params_rebuild_the_uniform_plan(tiny_arch):
    space = SearchSpace.model_validate({**SPACE, "baselines": ["Q8_0"]})
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.enqueue_trial(space.baseline_params(tiny_arch, "Q8_0"))
    plan = space.sample(study.ask(), tiny_arch)
    assert {c.quant for c in plan.groups.values()} == {"Q8_0"}
    assert {c.ffn_keep_ratio for c in plan.groups.values()} == {1.0}
    assert {c.rank_ratio for c in plan.groups.values()} == {0.0}


def test_gguf_target_refuses_decomposition(tmp_path):
    bad = {**SPACE, "target": "gguf"}
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(AutosquashError, match="gguf target cannot hold decompositions"):
        SearchSpace.load(tmp_path / "s.yaml")


def test_gguf_target_refuses_removing_an_ffn_alone():
    space = {"name": "s", "target": "gguf", "attn": {"quant": ["Q8_0"]}, "ffn": {"quant": ["Q8_0"]}}
    space["ffn"]["ffn_keep_ratio"] = [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot remove an FFN alone"):
        SearchSpace.model_validate(space)


def test_unknown_type_is_named(tmp_path):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SPACE, "ffn": {"quant": ["Q4_X"]}}))
    with pytest.raises(AutosquashError, match=r"s\.yaml.*ffn\.quant.*Q4_X"):
        SearchSpace.load(tmp_path / "s.yaml")


def test_shipped_spaces_load():
    from pathlib import Path

    for f in Path(__file__).parents[2].joinpath("search_spaces").glob("*.yaml"):
        SearchSpace.load(f)


def test_iq4_types_can_be_searched_and_others_are_named(tiny_arch):
    space = SearchSpace.model_validate(
        {**SPACE, "embed_quant": ["iq4_nl"], "attn": {"quant": ["IQ4_XS", "Q4_0"]}, "baselines": []}
    )
    assert space.embed_quant == ["IQ4_NL"] and space.attn.quant == ["IQ4_XS", "Q4_0"]
    plan = space.sample(optuna.create_study().ask(), tiny_arch)
    assert plan.embed_quant == "IQ4_NL" and plan.choice("blk.0.attn").quant in ("IQ4_XS", "Q4_0")
    lattice = SearchSpace.model_validate({**SPACE, "attn": {"quant": ["iq3_s", "IQ2_XS"]}, "baselines": []})
    assert lattice.attn.quant == ["IQ3_S", "IQ2_XS"]
    # A GGUF type autosquash does not write is refused by name.
    with pytest.raises(ValueError, match="IQ1_M is not a searchable type"):
        SearchSpace.model_validate({**SPACE, "attn": {"quant": ["IQ1_M"]}})


def test_without_pruning_holds_every_pruning_field_neutral_and_keeps_the_rest():
    space = SearchSpace.model_validate(
        {
            **SPACE,
            "attn": {**SPACE["attn"], "attn_keep_ratio": [1.0, 0.5]},
            "ffn": {**SPACE["ffn"], "ffn_keep_ratio": [1.0, 0.5, 0.0]},
        }
    )
    assert space.pruned() == ["attn.attn_keep_ratio", "ffn.ffn_keep_ratio"]
    kept = space.without_pruning()
    assert kept.pruned() == [] and kept.name == "t-no-pruning"
    assert kept.attn.attn_keep_ratio == kept.ffn.ffn_keep_ratio == [1.0]
    assert kept.attn.rank_ratio == [0.0, 0.25] and kept.ffn.quant == space.ffn.quant
    assert (kept.embed_quant, kept.baselines, kept.target) == (space.embed_quant, space.baselines, space.target)


def test_per_tensor_kinds_ask_each_linear_its_type_and_the_baselines_stay_uniform(tiny_arch):
    space = SearchSpace.model_validate(
        {**SPACE, "target": "gguf", "per_tensor": ["ffn"], "attn": {"quant": ["Q8_0", "Q4_0"]}}
    )
    options = space.options(tiny_arch)
    assert "blk.0.ffn.ffn_down.quant" in options and "blk.0.ffn.quant" not in options
    assert "blk.0.attn.quant" in options and "blk.0.attn.attn_v.quant" not in options
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    mixed = 0
    for _ in range(10):
        trial = study.ask()
        plan = space.sample(trial, tiny_arch)
        for i in range(tiny_arch.n_layers):
            c = plan.choice(f"blk.{i}.ffn")
            for name in ("ffn_gate", "ffn_up", "ffn_down"):
                assert c.quant_for(name) == trial.params[f"blk.{i}.ffn.{name}.quant"]
            assert c.quant == trial.params[f"blk.{i}.ffn.ffn_gate.quant"] and c.quant not in c.tensor_quant.values()
            mixed += bool(c.tensor_quant)
    assert mixed  # random types on three linears differ somewhere
    study.enqueue_trial(space.baseline_params(tiny_arch, "Q4_0"))
    plan = space.sample(study.ask(), tiny_arch)
    assert {c.quant for c in plan.groups.values()} == {"Q4_0"}
    assert all(not c.tensor_quant for c in plan.groups.values())


def test_per_tensor_names_a_kind():
    with pytest.raises(ValueError, match="per_tensor"):
        SearchSpace.model_validate({**SPACE, "per_tensor": ["mlp"]})


@pytest.mark.parametrize("per_tensor", [[], ["attn", "ffn"]])
def test_params_of_a_sampled_plan_are_the_params_it_was_sampled_from(tiny_arch, per_tensor):
    space = SearchSpace.model_validate({**SPACE, "per_tensor": per_tensor})
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        trial = study.ask()
        plan = space.sample(trial, tiny_arch)
        assert space.params_of(plan, tiny_arch) == trial.params
