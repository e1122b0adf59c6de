"""The cost model's out-of-sample validation: what the fits see and what they predict."""

import copy

import pytest

from autosquash.cost.validation import load_measurements, plan_for, price, validate
from autosquash.models.arch import Arch


@pytest.fixture(scope="module")
def data():
    return load_measurements()


def test_the_dataset_spans_phones_models_and_formats_with_a_source_per_row(data):
    rows = data["rows"]
    assert len({r["soc"] for r in rows}) >= 3 and len({r["model"] for r in rows}) >= 3
    assert len({r["quant"] for r in rows}) >= 2
    assert all(r["source"] in data["sources"] and r["decode_tokens_per_s"] > 0 for r in rows)
    # a published file size is a check of the pricing: ExecuTorch's BF16 files hold exactly the priced tensors
    for r in rows:
        if r["quant"] == "BF16" and r.get("file_mb"):
            assert price(r, data["models"]).weights_bytes / 2**20 == pytest.approx(r["file_mb"], rel=0.01)


def test_a_held_out_model_is_predicted_from_the_others_only(data):
    before = {(p.group, p.model, p.quant): p for p in validate(data)}
    changed = copy.deepcopy(data)
    target = next(r for r in changed["rows"] if r["model"] == "Qwen3-4B")
    target["decode_tokens_per_s"] *= 2  # what only the held-out row knows
    after = {(p.group, p.model, p.quant): p for p in validate(changed)}
    key = (target["group"], "Qwen3-4B", target["quant"])
    assert after[key].decode_predicted == pytest.approx(before[key].decode_predicted, rel=1e-12)
    assert after[key].decode_error_pct < before[key].decode_error_pct - 40  # measured doubled, prediction kept
    others = [k for k in before if k[0] == target["group"] and k != key]
    assert all(after[k].decode_predicted != before[k].decode_predicted for k in others)  # they did see it


def test_a_tied_table_takes_the_heads_type_and_recipes_come_from_llama_cpp(data):
    tied = Arch.from_config(data["models"]["Qwen3-1.7B"])
    assert plan_for(tied, {"linear": "Q4_0", "embed": "Q4_0", "head": "Q6_K"}).embed_quant == "Q6_K"
    untied = Arch.from_config(data["models"]["Llama-3.1-8B"])
    plan = plan_for(untied, {"linear": "Q4_0", "embed": "Q8_0", "head": "Q6_K"})
    assert (plan.embed_quant, plan.output_quant) == ("Q8_0", "Q6_K")
    mixture = plan_for(untied, {"recipe": "Q4_K_M"})
    assert mixture.groups["blk.0.attn"].tensor_quant == {"attn_v": "Q6_K"}  # first eighth: more bits
