"""Shared fixtures: tiny random Llama models built from a config (no downloads, no real weights)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autosquash.models.arch import Arch

# One cache for the session (converted models, calibration statistics): tests never read what an earlier run
# or the user's own searches left in ~/.cache/autosquash. Set AUTOSQUASH_CACHE_DIR to keep one across runs.
_OWN_CACHE = "AUTOSQUASH_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["AUTOSQUASH_CACHE_DIR"] = tempfile.mkdtemp(prefix="autosquash-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["AUTOSQUASH_CACHE_DIR"], ignore_errors=True)


# A 2-block decoder whose rows (256, 512) are whole K-quant super-blocks: the shape of every tiny test model.
TINY_SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def every_form_plan():
    """A tiny-model plan with each form (quantized, low-rank, Kronecker) and both prunings, mixed types."""
    from autosquash.compress.plan import LayerChoice, Plan

    return Plan(
        target="torch",
        embed_quant="Q4_0",
        groups={
            "blk.0.attn": LayerChoice(quant="Q4_K", attn_keep_ratio=0.5),
            "blk.0.ffn": LayerChoice(quant="Q6_K", ffn_keep_ratio=0.5, kron_rank=4),
            "blk.1.attn": LayerChoice(quant="Q2_K", rank_ratio=0.25),
            "blk.1.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.75),
        },
    )


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny Llama of TINY_SHAPE."""
    return LlamaConfig(**{**TINY_SHAPE, **overrides})


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture
def tiny_arch(tiny_model) -> Arch:
    return Arch.from_config(tiny_model.config)


@pytest.fixture
def tiny_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (4, 64), generator=g)


# Two types per group on the tiny random Llama: trials of a few seconds.
SMALL_SPACE = {
    "name": "small",
    "target": "gguf",
    "attn": {"quant": ["Q8_0", "Q4_0"]},
    "ffn": {"quant": ["Q8_0", "Q4_0"]},
    "baselines": ["Q8_0"],
}


def write_experiment(folder, model: str, space: dict, trials: int, workers: int = 1, name: str = "faults"):
    """An experiment file (and its space.yaml) in `folder` for a search of seconds a trial: small token sets,
    no healing, perplexity and memory the objectives; its path."""
    import yaml

    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    exp = {
        "name": name,
        "model": model,
        "phone": "iphone-16",
        "search_space": "space.yaml",
        "objectives": ["perplexity", "memory"],
        "trials": trials,
        "workers": workers,
        "context_tokens": 512,
        "calibration": {"source": "wikipedia", "tokens": 256, "seq_len": 128},
        "evaluation": {"source": "lambada", "tokens": 256, "seq_len": 128},
        "topk": 8,
        "heal": {"steps": 0},
    }
    (folder / "exp.yaml").write_text(yaml.safe_dump(exp))
    return folder / "exp.yaml"


def tiny_gguf(folder):
    """A tiny random Llama written as a Q8_0 GGUF file in `folder` (SmolLM2's tokenizer inside); its path."""
    import json

    from autosquash.compress.plan import Plan
    from autosquash.export.build import BuiltModel
    from autosquash.export.gguf_file import write_gguf
    from autosquash.models.load import load_model

    spec = folder / "config.json"
    spec.write_text(json.dumps({**TINY_SHAPE, "model_type": "llama", "vocab_size": 49152}))
    model = load_model(str(spec), seed=0)
    arch = Arch.from_config(model.config)
    path = folder / "m.gguf"
    write_gguf(path, BuiltModel(str(spec), model, arch, Plan.uniform(arch, "Q8_0"), {}))
    return path


SMOKE_TRIALS = 6


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke search (experiments/smoke.yaml: a tiny random Llama, real Optuna, Ray, MLflow and lm-eval)
    for every test that reads what a finished search leaves; tests that change a run work on a copy."""
    from pathlib import Path

    from autosquash.cli import main

    out = tmp_path_factory.mktemp("smoke") / "run"
    smoke = Path(__file__).parents[1] / "experiments/smoke.yaml"
    assert main(["search", str(smoke), "--trials", str(SMOKE_TRIALS), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def smoke_plain(tmp_path_factory) -> str:
    """experiments/smoke.yaml without its lm-eval step on the front and without healing (most of a torch
    trial's time; the smoke search itself heals and scores): for tests of how a search runs, stops and resumes."""
    from pathlib import Path

    from autosquash.search.experiment import BenchmarkSpec, HealSpec, load_experiment
    from autosquash.yaml_io import dump_yaml_model

    exp = load_experiment(Path(__file__).parents[1] / "experiments/smoke.yaml")  # paths made absolute
    path = tmp_path_factory.mktemp("experiment") / "smoke.yaml"
    dump_yaml_model(exp.model_copy(update={"benchmark": BenchmarkSpec(), "heal": HealSpec(steps=0)}), path)
    return str(path)


def copy_search(src, dst):
    """A search folder copied whole, its MLflow store pointed at the copy's artifacts (MLflow keeps absolute
    artifact URIs: a plain copy would log into the original's folder)."""
    import shutil
    import sqlite3

    from mlflow.tracking._tracking_service import utils

    # MLflow keeps each run's artifact location per process by run ID, which the copy shares: forget them.
    utils._artifact_repos_cache.clear()

    shutil.copytree(src, dst)
    old, new = (p.resolve().as_uri() for p in (src, dst))
    with sqlite3.connect(dst / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    db.close()
    return dst
