"""The pure parts of the benchmarks: the 2-D hypervolume, the llama.cpp mixtures as plans, the cost validation."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the scripts import their helpers by name

from _common import hypervolume_2d  # noqa: E402
from sampler_efficiency import beaten, curve  # noqa: E402

from autosquash.compress.plan import deployed_tensors  # noqa: E402
from autosquash.compress.recipes import llama_cpp_mixture, use_more_bits  # noqa: E402
from autosquash.models.arch import Arch  # noqa: E402

# SmolLM2-135M's shape: 576-wide rows (no K-quants but ffn_down's 1536), tied embeddings.
SMOLLM2 = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)


def test_hypervolume_of_a_staircase():
    # Two steps below the reference (10, 10): (2, 6) adds 8 x 4, then (5, 3) adds 5 x 3.
    assert hypervolume_2d([(2, 6), (5, 3)], (10, 10)) == pytest.approx(32 + 15)


def test_hypervolume_ignores_dominated_and_outside_points_and_order():
    front = [(5, 3), (2, 6)]
    extra = [(6, 7), (2, 6), (11, 1), (1, 10), (5, 3)]  # dominated, repeated, beyond or on the reference
    assert hypervolume_2d(front + extra, (10, 10)) == hypervolume_2d(front, (10, 10)) == pytest.approx(47)
    assert hypervolume_2d([], (10, 10)) == 0.0


def test_hypervolume_of_one_point_is_its_box():
    assert hypervolume_2d([(1.5, 2.0)], (4.0, 3.0)) == pytest.approx(2.5 * 1.0)


def test_hypervolume_curve_skips_failed_and_unfit_trials():
    points = [None, (5, 3), None, (2, 6)]
    assert curve(points, (10, 10)) == pytest.approx([0, 35, 35, 47])


def test_a_baseline_is_beaten_by_no_more_memory_and_lower_perplexity():
    baselines = {"Q4_K": (100.0, 20.0), "Q3_K": (90.0, 25.0), "Q2_K": (80.0, 40.0)}
    # Equal memory and lower perplexity beats Q4_K; equal perplexity does not beat Q3_K; Q2_K is smaller.
    points = [(100.0, 19.0), (85.0, 25.0), None]
    assert beaten(points, baselines) == ["Q4_K"]
    assert beaten([*points, (80.0, 24.0)], baselines) == ["Q4_K", "Q3_K", "Q2_K"]


def test_use_more_bits_on_30_blocks():
    """llama.cpp's rule: blocks below n/8, from 7n/8, and every third from n/8 + 2."""
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def _types(plan) -> dict[str, str]:
    return {t.name: t.type for t in deployed_tensors(SMOLLM2, plan) if len(t.shape) == 2}


def test_q4_k_m_on_smollm2_falls_back_as_llama_cpp():
    types = _types(llama_cpp_mixture(SMOLLM2, "Q4_K_M"))
    assert types["token_embd.weight"] == "Q8_0"  # the tied head's Q6_K, on 576-wide rows
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.3.attn_v.weight"] == "Q5_0"  # Q6_K / Q4_K
    assert types["blk.5.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"  # 1536-wide rows
    assert types["blk.4.attn_q.weight"] == types["blk.4.ffn_up.weight"] == "Q5_0"


def test_q3_k_m_on_smollm2_falls_back_as_llama_cpp():
    types = _types(llama_cpp_mixture(SMOLLM2, "Q3_K_M"))
    assert types["blk.1.attn_v.weight"] == "Q5_1" and types["blk.2.attn_v.weight"] == "Q5_0"  # Q5_K / Q4_K
    assert types["blk.0.ffn_down.weight"] == "Q5_K" and types["blk.1.ffn_down.weight"] == "Q4_K"
    assert types["blk.7.attn_output.weight"] == "Q5_0"  # Q4_K
    assert types["blk.7.attn_k.weight"] == types["blk.7.ffn_gate.weight"] == "Q4_0"  # Q3_K


def test_cost_validation_prints_its_table_and_json(tmp_path, capsys, monkeypatch):
    import json

    import cost_validation

    monkeypatch.setattr(sys, "argv", ["cost_validation.py", "--json"])
    cost_validation.main()
    out = json.loads(capsys.readouterr().out)
    medians = out["out_of_sample_median_error_pct"]
    assert set(medians) == {"decode_tokens_per_s", "energy_j_per_token"} and all(v > 0 for v in medians.values())
    assert {r["held_out"] for r in out["rows"]} == {"model", "row"}
    monkeypatch.setattr(sys, "argv", ["cost_validation.py", "--results", str(tmp_path)])
    cost_validation.main()
    assert "decode tok/s out of sample: median |error|" in (tmp_path / "cost_validation.txt").read_text()
