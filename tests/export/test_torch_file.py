"""The torch format holds what GGUF cannot (SVD and Kronecker factors, pruned sublayers, the adapter) and
loads back as exactly the model its trial evaluated."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.compress.quantize import quantize
from autosquash.errors import AutosquashError
from autosquash.evaluate.heal import adapter_tensors
from autosquash.evaluate.proxy import score
from autosquash.export.build import BuiltModel
from autosquash.export.lora import has_adapter
from autosquash.export.torch_file import load, save
from autosquash.models.load import load_model, resolve

DECOMPOSED = Plan(
    target="torch",
    embed_quant="Q4_0",
    groups={
        "blk.0.attn": LayerChoice(quant="Q4_K", rank_ratio=0.25, attn_keep_ratio=0.5),
        "blk.0.ffn": LayerChoice(quant="Q4_0", kron_rank=4),
        "blk.1.attn": LayerChoice(quant="Q8_0", attn_keep_ratio=0.0),
        "blk.1.ffn": LayerChoice(quant="Q2_K", ffn_keep_ratio=0.5),
    },
)
# All F16, so healing merges into the weights, the SVD factors included.
MERGED = Plan(target="torch", embed_quant="Q8_0", groups={"blk.0.attn": LayerChoice(quant="F16", rank_ratio=0.25)})


@pytest.mark.parametrize("plan", [DECOMPOSED, MERGED], ids=["adapter", "merged"])
def test_file_loads_back_as_the_trials_model(tmp_path, tiny_spec, tiny_model, tiny_arch, tiny_ref, make_trial, plan):
    model, cache = make_trial(plan)
    assert has_adapter(model) == (plan is DECOMPOSED)
    path = tmp_path / "m.safetensors"
    save(path, BuiltModel(tiny_spec, tiny_model, tiny_arch, plan, {}, cache=cache, model=model))
    loaded, spec = load(path)
    assert spec == tiny_spec  # whose tokenizer the model uses
    with torch.no_grad():
        # Bitwise: the stored GGUF blocks decode, through the trials' dequantizer, to the evaluated weights.
        assert torch.equal(loaded(tiny_ref.batch).logits, model(tiny_ref.batch).logits)
    assert score(loaded, tiny_ref) == score(model, tiny_ref)
    with pytest.raises(AutosquashError, match="torch format, not a base model"):
        load_model(str(path))  # a compressed model is no base to search from: `load` reads it


def test_file_holds_what_the_cost_model_prices(tmp_path, tiny_spec, tiny_model, tiny_arch, make_trial):
    model, cache = make_trial(DECOMPOSED)
    path = tmp_path / "m.safetensors"
    save(path, BuiltModel(tiny_spec, tiny_model, tiny_arch, DECOMPOSED, {}, cache=cache, model=model))
    with safe_open(str(path), "pt") as f:
        types = json.loads(f.metadata()["types"])
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    priced = deployed_tensors(tiny_arch, DECOMPOSED)
    assert {"blk.0.attn_q.lr_a", "blk.0.ffn_up.kron_a", "blk.0.ffn_up.row_perm"} <= {t.name for t in priced}
    for t in priced:
        assert stored[t.name].numel() * stored[t.name].element_size() == t.nbytes, t.name
        if t.name in types:
            assert types[t.name][0] == t.type, t.name
    adapter_bytes = sum(stored[n].numel() for n in types if n.endswith((".lora_a", ".lora_b")))
    assert adapter_bytes == sum(t.nbytes for t in adapter_tensors(model))  # the adapter in F16, as priced
    assert not any(name.startswith("blk.1.attn") for name in stored)  # a removed attention stores nothing


def test_foreign_files_are_one_line_errors(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AutosquashError, match="not autosquash's torch format"):
        resolve(str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AutosquashError, match="not an autosquash torch-format file"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(AutosquashError, match="does not exist"):
        resolve(str(tmp_path / "missing.safetensors"))


def test_quantized_tensor_bytes_are_kept_as_uint8_rows(tmp_path, tiny_spec, tiny_model, tiny_arch, make_trial):
    plan = Plan.uniform(tiny_arch, "Q4_K")
    model, cache = make_trial(plan, steps=0)
    save(tmp_path / "q.safetensors", BuiltModel(tiny_spec, tiny_model, tiny_arch, plan, {}, cache=cache, model=model))
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        raw = f.get_tensor("blk.0.ffn_down.weight")
        qtype, rows, cols = json.loads(f.metadata()["types"])["blk.0.ffn_down.weight"]
    assert raw.dtype == torch.uint8 and qtype == "Q4_K" and (rows, cols) == (256, 512)
    q = quantize(tiny_model.model.layers[0].mlp.down_proj.weight, "Q4_K")  # what compress does without stats
    assert (raw.numpy() == q.data).all()
