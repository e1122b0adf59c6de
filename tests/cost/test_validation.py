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


def test_three_socs_each_hold_three_models_at_two_quantizations_in_one_setting(data):
    cells: dict[str, dict[str, set]] = {}
    for r in data["rows"]:
        if r["source"] == "pocketpal_sweep":
            cells.setdefault(r["soc"], {}).setdefault(r["model"], set()).add(r["quant"])
    full = [soc for soc, models in cells.items() if sum(len(q) >= 2 for q in models.values()) >= 3]
    assert len(full) >= 3
    keys = [(r["group"], r["model"], r["quant"]) for r in data["rows"]]
    assert len(keys) == len(set(keys))  # one row per phone, model and quantization


def test_llama_cpps_buffers_on_the_phone_check_the_memory_estimate(data):
    """The sweep's load logs: an untied model's weights, a full-attention model's KV cache and a Llama/Qwen
    compute buffer are what the cost model sizes, a tied table held twice when the file is not mapped."""
    from autosquash.compress.plan import deployed_tensors
    from autosquash.cost.model import compute_buffer_bytes, estimate, kv_cache_bytes_per_token, kv_cells
    from autosquash.cost.phone import load_phone

    rows = {(r["model"], r["quant"]): r for r in data["rows"] if r["source"] == "pocketpal_sweep"}
    mib = 2**20

    def arch(model):
        return Arch.from_config(data["models"][model])

    # Weights: the file's tensors, a tied table twice (the sweep read files into llama.cpp's buffers, not mapped).
    # Qwen3-1.7B's files store an output tensor of their own although its config ties it; Phi's Q4_K_M files
    # keep their fused QKV matrix at Q5_K, which the recipe (written for split q/k/v) does not know.
    unmapped = load_phone("pixel-9-pro").model_copy(update={"mmap_weights": False})
    checked = 0
    for (model, quant), r in rows.items():
        if model == "Qwen3-1.7B" or (model.startswith("Phi") and quant == "Q4_K_M") or quant == "Q4_0":
            continue  # Q4_0 files keep part of one matrix per block at Q4_1 (about 2.5 MiB)
        a = arch(model)
        report = estimate(a, deployed_tensors(a, plan_for(a, r["weights"])), unmapped)
        assert report.model_buffer_bytes / mib == pytest.approx(r["model_buffer_mib"], abs=0.05), (model, quant)
        checked += 1
    assert checked >= 10
    for model in ("DeepSeek-R1-Distill-Qwen-1.5B", "Qwen3-1.7B", "SmolLM2-1.7B", "Phi-4-mini"):
        r = rows[(model, "Q4_0")]
        assert kv_cache_bytes_per_token(arch(model)) * kv_cells(2048) / mib == pytest.approx(r["kv_buffer_mib"])
    for model in ("DeepSeek-R1-Distill-Qwen-1.5B", "Qwen3-1.7B", "SmolLM2-1.7B", "Gemma-3-1B"):
        r = rows[(model, "Q4_0")]
        compute = compute_buffer_bytes(arch(model), kv_cells(2048), 512, flash_attention=True) / mib
        assert compute == pytest.approx(r["compute_buffer_mib"], abs=0.01)
