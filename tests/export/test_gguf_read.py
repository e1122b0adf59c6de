"""autosquash reads its own GGUF files back, `deci` ones (which transformers refuses) included."""

import pytest
import torch
from gguf import GGUFReader

from autosquash.compress.apply import compress
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.errors import AutosquashError
from autosquash.evaluate.proxy import score
from autosquash.export.gguf_file import write_gguf
from autosquash.export.lora import has_adapter
from autosquash.formats.gguf import gguf_architecture, read_gguf_config, rope_permute, rope_unpermute
from autosquash.models.layers import RemovedAttention, RemovedMLP
from autosquash.models.load import load_arch, load_model, read_gguf_model

PRUNED = Plan(
    groups={
        "blk.0.attn": LayerChoice(quant="Q4_K", attn_keep_ratio=0.5),
        "blk.0.ffn": LayerChoice(quant="Q2_K", ffn_keep_ratio=0.5, tensor_quant={"ffn_down": "Q8_0"}),
        # Block 1 removed whole (an FFN removed alone is refused: llama.cpp would drop its attention too).
        "blk.1.attn": LayerChoice(quant="Q6_K", attn_keep_ratio=0.0),
        "blk.1.ffn": LayerChoice(quant="Q3_K", ffn_keep_ratio=0.0),
    }
)


def test_rope_unpermute_inverts_rope_permute():
    rows = torch.arange(4 * 64 * 3, dtype=torch.float32).reshape(4 * 64, 3)
    permuted = torch.from_numpy(rope_permute(rows.numpy(), 64))
    assert not torch.equal(permuted, rows) and torch.equal(rope_unpermute(permuted, 64), rows)


def test_deci_file_reads_back_as_the_evaluated_model(tmp_path, tiny_spec, tiny_model, tiny_arch, tiny_ref):
    path = tmp_path / "p.gguf"
    write_gguf(path, tiny_spec, tiny_model, tiny_arch, PRUNED, {})
    assert gguf_architecture(path) == GGUFReader(path).fields["general.architecture"].contents() == "deci"
    evaluated = compress(tiny_model, tiny_arch, PRUNED, {})
    loaded = load_model(str(path))  # the one loader dispatches deci files to autosquash's reader
    blocks = loaded.model.layers
    assert isinstance(blocks[1].mlp, RemovedMLP) and isinstance(blocks[1].self_attn, RemovedAttention)
    assert blocks[0].self_attn.q_proj.weight.shape == (128, 256) and blocks[0].mlp.down_proj.weight.shape == (256, 256)
    with torch.no_grad():
        # Bitwise: same bytes, same dequantizer, q/k rows back in Hugging Face's order (1 of 2 KV groups kept).
        assert torch.equal(loaded(tiny_ref.batch).logits, evaluated(tiny_ref.batch).logits)
    assert score(loaded, tiny_ref) == score(evaluated, tiny_ref)
    config = read_gguf_config(path)  # the widest block: what load_arch reports for a deci file
    assert (config.intermediate_size, config.num_key_value_heads, config.head_dim) == (256, 1, 64)
    assert load_arch(str(path)).vocab_size == tiny_arch.vocab_size


def test_uniformly_pruned_heads_stay_llama_and_transformers_agrees(tmp_path, tiny_spec, tiny_model, tiny_arch):
    half = LayerChoice(quant="Q8_0", attn_keep_ratio=0.5)
    plan = Plan(groups={f"blk.{i}.attn": half for i in range(tiny_arch.n_layers)})
    path = tmp_path / "h.gguf"
    write_gguf(path, tiny_spec, tiny_model, tiny_arch, plan, {})
    assert gguf_architecture(path) == "llama"
    theirs = dict(load_model(str(path)).named_parameters())  # transformers' GGUF reader, its own un-permutation
    ours = dict(read_gguf_model(path).named_parameters())
    for name, p in compress(tiny_model, tiny_arch, plan, {}).named_parameters():
        assert torch.equal(p, theirs[name]) and torch.equal(p, ours[name]), name


def test_merged_healing_is_in_the_f16_weights(tmp_path, tiny_spec, tiny_model, tiny_arch, tiny_ref, make_trial):
    plan = Plan.uniform(tiny_arch, "F16", embed_quant="Q8_0")
    model, cache = make_trial(plan)
    assert not has_adapter(model)  # merged: no adapter file
    path = tmp_path / "f.gguf"
    write_gguf(path, tiny_spec, tiny_model, tiny_arch, plan, {}, cache, model=model)
    loaded = read_gguf_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(tiny_ref.batch).logits, model(tiny_ref.batch).logits)
        unhealed = compress(tiny_model, tiny_arch, plan, {})
        assert not torch.equal(loaded(tiny_ref.batch).logits, unhealed(tiny_ref.batch).logits)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.gguf").write_text("plain text")
    with pytest.raises(AutosquashError, match="not a GGUF file"):
        gguf_architecture(tmp_path / "x.gguf")
