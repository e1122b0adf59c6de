import json

import pytest

from autosquash.errors import AutosquashError
from autosquash.models.load import load_arch, load_model, resolve


def test_specs_are_classified(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)).kind == "folder"
    assert resolve(str(tmp_path / "config.json")).kind == "config"
    assert resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(AutosquashError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))


def test_config_json_gives_a_seeded_random_model(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 100,
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    a, b = load_model(str(tmp_path / "c.json"), seed=3), load_model(str(tmp_path / "c.json"), seed=3)
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert load_arch(str(tmp_path / "c.json")).head_dim == 32


def test_bad_config_value_is_one_error(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "llama", "initializer_range": 5e4}))
    with pytest.raises(AutosquashError, match="initializer_range"):
        load_model(str(tmp_path / "c.json"))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(AutosquashError, match="gpt2"):
        load_arch(str(tmp_path / "c.json"))


def test_torch_format_files_are_their_own_kind(tmp_path, tiny_model, tiny_arch):
    from autosquash.compress.plan import Plan
    from autosquash.export.torch_file import save

    plan = Plan.uniform(tiny_arch, "Q8_0")
    spec = str(tmp_path / "base.json")
    save(tmp_path / "m.safetensors", spec, tiny_model, tiny_arch, plan, {})
    src = resolve(str(tmp_path / "m.safetensors"))
    assert src.kind == "torch" and src.key.startswith("torch:")
    assert load_arch(str(tmp_path / "m.safetensors")) == tiny_arch  # from the base config it records
