"""A GGUF export holds exactly the weights its trial evaluated, and transformers loads it back."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from autosquash.compress.apply import compress
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import open_gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_model

TINY = str(Path(__file__).parents[2] / "experiments/tiny-llama.json")


@pytest.fixture(scope="module")
def tiny():
    base = load_model(TINY)
    return base, Arch.from_config(base.config)


def _mixed(arch: Arch) -> Plan:
    return Plan(
        embed_quant="Q4_0",
        groups={
            "blk.0.attn": LayerChoice(quant="Q3_K", tensor_quant={"attn_v": "Q6_K"}),
            "blk.0.ffn": LayerChoice(quant="Q2_K"),
            "blk.1.attn": LayerChoice(quant="Q5_1"),
            "blk.1.ffn": LayerChoice(quant="Q4_K", tensor_quant={"ffn_down": "Q8_0"}),
        },
    )


@pytest.mark.parametrize("which", ["Q4_K", "Q3_K", "mixed"])
def test_export_round_trips_exactly_through_transformers(tiny, tmp_path, which):
    base, arch = tiny
    plan = _mixed(arch) if which == "mixed" else Plan.uniform(arch, which)
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(TINY, base, arch, plan, {}))
    types = {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
    if which == "mixed":
        assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q3_K"
        assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    evaluated = compress(base, arch, plan, {})
    theirs = dict(loaded.named_parameters())
    for name, p in evaluated.named_parameters():
        # Bitwise: the file decodes to the very weights the trial scored (q/k rows un-permuted on load).
        assert torch.equal(p, theirs[name]), name


def test_low_rank_plans_are_refused(tiny, tmp_path):
    from autosquash.errors import AutosquashError

    base, arch = tiny
    plan = Plan(target="torch", groups={"blk.0.attn": LayerChoice(quant="Q8_0", rank_ratio=0.25)})
    with pytest.raises(AutosquashError, match="low-rank"):
        write_gguf(tmp_path / "m.gguf", BuiltModel(TINY, base, arch, plan, {}))


def test_pruned_plan_is_written_as_deci_with_per_layer_shapes(tiny, tmp_path):
    base, arch = tiny
    plan = Plan(
        groups={
            "blk.0.ffn": LayerChoice(quant="Q4_0", ffn_keep_ratio=0.5),
            "blk.0.attn": LayerChoice(quant="Q4_0", attn_keep_ratio=0.5),
            "blk.1.attn": LayerChoice(quant="Q4_0", attn_keep_ratio=0.0),
            "blk.1.ffn": LayerChoice(quant="Q4_0"),
        }
    )
    write_gguf(tmp_path / "p.gguf", BuiltModel(TINY, base, arch, plan, {}))
    reader = open_gguf(tmp_path / "p.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [256, 512]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 0]
    assert reader.fields["deci.attention.head_count"].contents() == [2, 0]
    names = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert names["blk.0.ffn_down.weight"] == (256, 256) and names["blk.0.attn_k.weight"] == (256, 64)
    assert not any(n.startswith("blk.1.attn") for n in names) and "blk.1.ffn_norm.weight" in names


def test_an_ffn_removed_alone_is_refused(tiny, tmp_path):
    """llama.cpp's deci graph skips the rest of a block whose FFN width is 0, its attention output
    included (measured with llama-cpp-python 0.3.36), so such a file would compute something else."""
    base, arch = tiny
    plan = Plan(groups={"blk.1.ffn": LayerChoice(ffn_keep_ratio=0.0)})
    with pytest.raises(AutosquashError, match="remove the FFN but keep the attention"):
        write_gguf(tmp_path / "m.gguf", BuiltModel(TINY, base, arch, plan, {}))


@pytest.mark.parametrize("which", ["mixed", "pruned"])
def test_a_file_is_priced_as_the_plan_it_was_written_from(tiny, tmp_path, which):
    from autosquash.compress.plan import deployed_tensors, kv_heads_per_layer
    from autosquash.cost import estimate, file_tensors, load_phone

    base, arch = tiny
    plan = _mixed(arch)
    if which == "pruned":
        plan.groups["blk.0.ffn"] = LayerChoice(quant="Q4_0", ffn_keep_ratio=0.5)
        plan.groups["blk.1.attn"] = LayerChoice(quant="Q4_0", attn_keep_ratio=0.5)
    write_gguf(tmp_path / "m.gguf", BuiltModel(TINY, base, arch, plan, {}))
    phone = load_phone("iphone-16")
    planned = estimate(arch, deployed_tensors(arch, plan), phone, kv_heads_per_layer=kv_heads_per_layer(arch, plan))
    file_arch, tensors, kv_heads = file_tensors(tmp_path / "m.gguf")
    stored = estimate(file_arch, tensors, phone, kv_heads_per_layer=kv_heads)
    # Every number the cost model gives: the same tensors, types, shapes and work per token, from either side.
    assert stored.to_dict() == planned.to_dict()
    assert stored.weights_bytes == sum(int(t.n_bytes) for t in open_gguf(tmp_path / "m.gguf").tensors)


def test_estimate_prices_a_gguf_file_as_stored_unless_told_a_type(tiny, tmp_path, capsys):
    import json

    from autosquash.cli import main

    base, arch = tiny
    write_gguf(tmp_path / "m.gguf", BuiltModel(TINY, base, arch, _mixed(arch), {}))
    stored = sum(int(t.n_bytes) for t in open_gguf(tmp_path / "m.gguf").tensors)
    reports = {}
    for extra in ([], ["--uniform", "F16"]):
        assert main(["estimate", "--model", str(tmp_path / "m.gguf"), "--phone", "iphone-16", "--json", *extra]) == 0
        reports[bool(extra)] = json.loads(capsys.readouterr().out)
    assert reports[False]["weights_bytes"] == stored < reports[True]["weights_bytes"]
