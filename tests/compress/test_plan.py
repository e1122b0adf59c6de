import pytest

from autosquash.compress.operators.svd import factor_rank
from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors, kept_ffn_channels
from autosquash.errors import AutosquashError
from autosquash.formats.gguf_types import legal_type
from autosquash.models.arch import Arch
from autosquash.yaml_io import dump_yaml_model, load_yaml_model

SMOLLM2 = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)


def test_uniform_plan_bytes_match_block_sizes():
    # SmolLM2 has 134.5M parameters; F16 is exactly 2 bytes each (norms stay F32).
    f16 = sum(t.nbytes for t in deployed_tensors(SMOLLM2, Plan.uniform(SMOLLM2, "F16")))
    q8 = sum(t.nbytes for t in deployed_tensors(SMOLLM2, Plan.uniform(SMOLLM2, "Q8_0")))
    assert 268e6 < f16 < 270e6
    assert q8 / f16 == pytest.approx(8.5 / 16, abs=0.002)


def test_k_quants_fall_back_on_576_wide_rows():
    types = {
        t.name.split(".")[2]: t.type
        for t in deployed_tensors(SMOLLM2, Plan.uniform(SMOLLM2, "Q4_K"))
        if t.name.startswith("blk.0.")
    }
    assert types["attn_q"] == "Q5_0" and types["ffn_gate"] == "Q5_0"  # 576-wide rows: llama.cpp's fallback
    assert types["ffn_down"] == "Q4_K"  # 1536-wide rows hold Q4_K


def test_iq4_types_are_sized_per_block_and_iq4_xs_falls_back_to_iq4_nl_on_576_wide_rows():
    for quant, fallback in (("IQ4_NL", "IQ4_NL"), ("IQ4_XS", "IQ4_NL")):
        tensors = {t.name: t for t in deployed_tensors(SMOLLM2, Plan.uniform(SMOLLM2, quant))}
        q, down = tensors["blk.0.attn_q.weight"], tensors["blk.0.ffn_down.weight"]
        assert q.type == fallback and down.type == quant  # as llama.cpp: 576 = 18 blocks of 32, 1536 = 6 of 256
        assert q.nbytes == 576 * 576 // 32 * 18  # block_iq4_nl: f16 d + 16 bytes of indices per 32 values
        assert down.nbytes == (576 * 1536 // 32 * 18 if quant == "IQ4_NL" else 576 * 1536 // 256 * 136)
    with pytest.raises(AutosquashError, match="IQ4_NL"):
        legal_type("IQ4_NL", 40)


def test_pruning_and_rank_shrink_the_tensors():
    plan = Plan(
        target="torch",
        groups={
            "blk.0.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.5),
            "blk.1.attn": LayerChoice(quant="Q8_0", rank_ratio=0.25),
        },
    )
    t = {x.name: x for x in deployed_tensors(SMOLLM2, plan)}
    assert t["blk.0.ffn_down.weight"].shape == (576, kept_ffn_channels(SMOLLM2, plan.choice("blk.0.ffn")))
    r = factor_rank(576, 576, 0.25)
    assert r % 32 == 0 and t["blk.1.attn_q.lr_a"].shape == (r, 576) and t["blk.1.attn_q.lr_b"].shape == (576, r)


def test_rank_that_saves_nothing_is_dropped():
    assert factor_rank(64, 64, 0.9) == 0


def test_plan_yaml_round_trip(tmp_path):
    plan = Plan(groups={"blk.0.ffn": LayerChoice(quant="q4_k", tensor_quant={"ffn_down": "Q6_K"})})
    dump_yaml_model(plan, tmp_path / "p.yaml")
    again = load_yaml_model(Plan, tmp_path / "p.yaml")
    assert again == plan and again.choice("blk.0.ffn").quant_for("ffn_down") == "Q6_K"


def test_bad_plan_names_file_and_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("groups:\n  blk.0.attn: {quant: Q9_9}\n")
    with pytest.raises(AutosquashError, match=r"bad\.yaml.*blk\.0\.attn\.quant"):
        load_yaml_model(Plan, tmp_path / "bad.yaml")


def test_check_plan_refuses_groups_the_model_lacks_in_one_line():
    from autosquash.compress.plan import LayerChoice, Plan, check_plan
    from autosquash.errors import AutosquashError
    from autosquash.models.arch import Arch
    from tests.conftest import tiny_config

    arch = Arch.from_config(tiny_config())
    every = {f"blk.{i}.{k}": LayerChoice(quant="Q8_0") for i in range(2) for k in ("attn", "ffn")}
    ok = Plan(groups=every | {"blk.1.ffn": LayerChoice(quant="Q4_0", tensor_quant={"ffn_down": "Q8_0"})})
    assert check_plan(ok, arch, "p.yaml") is ok
    for groups, msg in (
        ({"blk.2.attn": LayerChoice()}, "past the model's 2 blocks"),
        ({"layer.0.attn": LayerChoice()}, "is not of the form blk.<i>.attn"),
        ({"blk.0.mlp": LayerChoice()}, "is not of the form"),
        ({"blk.0.ffn": LayerChoice(tensor_quant={"attn_v": "Q8_0"})}, "names tensors of another sublayer: attn_v"),
    ):
        with pytest.raises(AutosquashError, match=msg) as e:
            check_plan(Plan(groups=every | groups), arch, "p.yaml")
        assert str(e.value).startswith("p.yaml: ") and "\n" not in str(e.value)


def test_check_plan_refuses_a_plan_that_leaves_groups_of_the_model_out():
    """A group a plan leaves out would deploy at F16, priced and exported without a word: refused instead."""
    from autosquash.compress.plan import check_plan
    from tests.conftest import tiny_config

    two_blocks = Plan.uniform(Arch.from_config(tiny_config()), "Q4_0")  # a plan of the 2-block tiny model
    with pytest.raises(AutosquashError) as e:
        check_plan(two_blocks, SMOLLM2, "tiny.yaml")  # applied to SmolLM2's 30 blocks
    msg = str(e.value)
    assert msg.startswith("tiny.yaml: no choice for 56 of the model's 60 groups (blk.2.attn, blk.2.ffn, ")
    assert "and 52 more" in msg and "\n" not in msg
    with pytest.raises(AutosquashError, match="no choice for 60 of the model's 60 groups"):
        check_plan(Plan(groups={}), SMOLLM2, "empty.yaml")
    missing_one = dict(Plan.uniform(SMOLLM2, "Q4_0").groups)
    del missing_one["blk.29.ffn"]
    with pytest.raises(AutosquashError, match=r"no choice for 1 of the model's 60 groups \(blk\.29\.ffn\)"):
        check_plan(Plan(groups=missing_one), SMOLLM2, "p.yaml")
    whole = Plan.uniform(SMOLLM2, "Q4_0")
    assert check_plan(whole, SMOLLM2, "p.yaml") is whole
