"""A healed trial whose weights stay quantized ships its LoRA adapter as a GGUF LoRA file llama.cpp loads;
the model file plus that adapter re-measure exactly the trial's quality."""

import pytest
import torch
from gguf import GGUFReader

from autosquash.compress.apply import compress
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.errors import AutosquashError
from autosquash.evaluate.proxy import score
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import gguf_arch, write_gguf
from autosquash.export.lora import (
    adapter_weights,
    apply_adapter,
    lora_path,
    module_path,
    read_gguf_lora,
    tensor_name,
    write_gguf_lora,
)
from autosquash.formats.gguf import open_gguf, rope_permute
from autosquash.models.load import read_gguf_model

PRUNED = Plan(
    groups={
        "blk.0.attn": LayerChoice(quant="Q5_0", attn_keep_ratio=0.5),
        "blk.0.ffn": LayerChoice(quant="Q4_K", ffn_keep_ratio=0.5),
        "blk.1.attn": LayerChoice(quant="Q4_0", attn_keep_ratio=0.0),
        "blk.1.ffn": LayerChoice(quant="Q8_0"),
    }
)


def _export(tmp_path, spec, tiny_model, tiny_arch, plan, model, cache):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(spec, tiny_model, tiny_arch, plan, {}, cache=cache, model=model))
    adapter, alpha = adapter_weights(model)
    write_gguf_lora(lora_path(path), adapter, alpha, tiny_arch, gguf_arch(tiny_arch, plan))
    return path, lora_path(path)


def test_adapter_file_has_llama_cpp_keys_names_and_shapes(tmp_path, tiny_spec, tiny_model, tiny_arch, make_trial):
    plan = Plan.uniform(tiny_arch, "Q8_0")
    model, cache = make_trial(plan)
    path, lora = _export(tmp_path, tiny_spec, tiny_model, tiny_arch, plan, model, cache)
    assert lora.name == "m.lora.gguf"
    reader = GGUFReader(lora)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0  # peft's lora_alpha = 2 * rank: llama.cpp scales by alpha / rank
    model_file = open_gguf(path)
    assert fields["general.architecture"] == model_file.fields["general.architecture"].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * tiny_arch.n_layers
    for name, t in tensors.items():
        assert t.tensor_type.name == "F16" and name.endswith((".lora_a", ".lora_b"))
    for t in model_file.tensors:
        if not t.name.startswith("blk.") or "norm" in t.name:
            continue
        weight, (ne0, ne1) = t.name, t.shape
        a, b = (tensors[f"{weight}.lora_{x}"].shape for x in "ab")
        # llama-adapter.cpp's checks, in ggml order (ne0 = row length): a is (in, rank), b is (rank, out).
        assert a[0] == ne0 and b[1] == ne1 and a[1] == b[0] == 4, weight
    adapter, _ = adapter_weights(model)
    b_q = adapter["blk.0.attn_q.weight"][1]
    written = tensors["blk.0.attn_q.weight.lora_b"].data
    assert (written == rope_permute(b_q.half().numpy(), tiny_arch.head_dim)).all()  # rope-permuted like attn_q


@pytest.mark.parametrize("which", ["llama", "deci"])
def test_model_file_plus_adapter_gives_the_trials_quality(
    tmp_path, tiny_spec, tiny_model, tiny_arch, tiny_ref, make_trial, which
):
    plan = Plan.uniform(tiny_arch, "Q4_K") if which == "llama" else PRUNED
    model, cache = make_trial(plan)
    assert adapter_weights(model)[0]  # quantized weights: the adapter stays apart
    path, lora = _export(tmp_path, tiny_spec, tiny_model, tiny_arch, plan, model, cache)
    adapter, alpha, arch_name = read_gguf_lora(lora)
    assert arch_name == which
    loaded = apply_adapter(read_gguf_model(path), adapter, alpha)
    with torch.no_grad():
        # Bitwise: the files hold exactly the trial's weights and F16 adapter, applied as peft applied it.
        assert torch.equal(loaded(tiny_ref.batch).logits, model(tiny_ref.batch).logits)
    assert score(loaded, tiny_ref) == score(model, tiny_ref)


def test_tensor_names_map_both_ways():
    for path in (
        "model.layers.3.self_attn.q_proj",
        "model.layers.0.mlp.down_proj.lr_a",
        "model.layers.1.mlp.up_proj.lr_b",
    ):
        assert module_path(tensor_name(path)) == path
    assert tensor_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight"
    assert tensor_name("model.layers.0.mlp.down_proj.lr_a") == "blk.0.ffn_down.lr_a"
    with pytest.raises(AutosquashError, match="not a block linear"):
        tensor_name("lm_head")


def test_bad_adapter_files_are_one_line_errors(tmp_path, tiny_spec, tiny_model, tiny_arch, make_trial):
    with pytest.raises(AutosquashError, match="does not exist"):
        read_gguf_lora(tmp_path / "none.lora.gguf")
    (tmp_path / "t.gguf").write_text("not a gguf file at all")
    with pytest.raises(AutosquashError, match="not a GGUF file"):
        read_gguf_lora(tmp_path / "t.gguf")
    plan = Plan.uniform(tiny_arch, "Q8_0")
    model, cache = make_trial(plan)
    path, lora = _export(tmp_path, tiny_spec, tiny_model, tiny_arch, plan, model, cache)
    with pytest.raises(AutosquashError, match="not a LoRA adapter"):
        read_gguf_lora(path)
    adapter, alpha, _ = read_gguf_lora(lora)
    with pytest.raises(AutosquashError, match="shapes"):  # a pruned model's narrower weights
        apply_adapter(compress(tiny_model, tiny_arch, PRUNED, {}), adapter, alpha)
