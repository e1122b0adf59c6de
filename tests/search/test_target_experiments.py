"""The experiments for real phone-sized targets load, and their space offers the whole K-quant ladder
without a fallback on those models' rows (widths that are multiples of 256)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.models.arch import Arch
from autosquash.search.experiment import load_experiment
from autosquash.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests/cost/configs"


@pytest.mark.parametrize(
    ("experiment", "config"),
    [("llama-3.2-1b-pixel9.yaml", "Llama-3.2-1B"), ("qwen2.5-1.5b-iphone16.yaml", "Qwen2.5-1.5B")],
)
def test_target_experiment_loads_and_its_ladder_needs_no_fallback(experiment, config):
    exp = load_experiment(ROOT / "experiments" / experiment)
    assert exp.hardware.device == "auto" and "/" in exp.model  # a hub id: downloaded by users with internet
    space = SearchSpace.load(exp.search_space)
    assert {"Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"} <= set(space.ffn.quant)
    arch = Arch.from_json(CONFIGS / config)
    for quant in space.baselines:
        types = {t.type for t in deployed_tensors(arch, Plan.uniform(arch, quant)) if t.name.startswith("blk.")}
        assert types - {"F32"} == {quant}, (quant, types)  # every block matrix in the type asked for
