"""autosquash reads its own GGUF files back, `deci` ones (which transformers refuses) included."""

import pytest
import torch

from autosquash.compress.apply import compress
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.errors import AutosquashError
from autosquash.evaluate.proxy import score
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.export.lora import has_adapter
from autosquash.formats.gguf import gguf_architecture, rope_permute, rope_unpermute
from autosquash.models.layers import RemovedAttention, RemovedMLP
from autosquash.models.load import gguf_layout, load_arch, load_model, read_gguf_model

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
    write_gguf(path, BuiltModel(tiny_spec, tiny_model, tiny_arch, PRUNED, {}))
    assert gguf_architecture(path) == "deci"
    evaluated = compress(tiny_model, tiny_arch, PRUNED, {})
    loaded = load_model(str(path))  # the one loader dispatches deci files to autosquash's reader
    blocks = loaded.model.layers
    assert isinstance(blocks[1].mlp, RemovedMLP) and isinstance(blocks[1].self_attn, RemovedAttention)
    assert blocks[0].self_attn.q_proj.weight.shape == (128, 256) and blocks[0].mlp.down_proj.weight.shape == (256, 256)
    with torch.no_grad():
        # Bitwise: same bytes, same dequantizer, q/k rows back in Hugging Face's order (1 of 2 KV groups kept).
        assert torch.equal(loaded(tiny_ref.batch).logits, evaluated(tiny_ref.batch).logits)
    assert score(loaded, tiny_ref) == score(evaluated, tiny_ref)
    config = gguf_layout(path).config  # the widest block: what load_arch reports for a deci file
    assert (config.intermediate_size, config.num_key_value_heads, config.head_dim) == (256, 1, 64)
    assert load_arch(str(path)).vocab_size == tiny_arch.vocab_size


def test_uniformly_pruned_heads_stay_llama_and_transformers_agrees(tmp_path, tiny_spec, tiny_model, tiny_arch):
    half = LayerChoice(quant="Q8_0", attn_keep_ratio=0.5)
    plan = Plan(groups={f"blk.{i}.attn": half for i in range(tiny_arch.n_layers)})
    path = tmp_path / "h.gguf"
    write_gguf(path, BuiltModel(tiny_spec, tiny_model, tiny_arch, plan, {}))
    assert gguf_architecture(path) == "llama"
    from transformers import AutoModelForCausalLM

    # transformers' own GGUF reader, its own un-permutation: an independent check of autosquash's
    transformers_read = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    theirs = dict(transformers_read.named_parameters())
    ours = dict(load_model(str(path)).named_parameters())
    for name, p in compress(tiny_model, tiny_arch, plan, {}).named_parameters():
        assert torch.equal(p, theirs[name]) and torch.equal(p, ours[name]), name


def test_merged_healing_is_in_the_f16_weights(tmp_path, tiny_spec, tiny_model, tiny_arch, tiny_ref, make_trial):
    plan = Plan.uniform(tiny_arch, "F16", embed_quant="Q8_0")
    model, cache = make_trial(plan)
    assert not has_adapter(model)  # merged: no adapter file
    path = tmp_path / "f.gguf"
    write_gguf(path, BuiltModel(tiny_spec, tiny_model, tiny_arch, plan, {}, cache=cache, model=model))
    loaded = read_gguf_model(path)
    with torch.no_grad():
        assert torch.equal(loaded(tiny_ref.batch).logits, model(tiny_ref.batch).logits)
        unhealed = compress(tiny_model, tiny_arch, plan, {})
        assert not torch.equal(loaded(tiny_ref.batch).logits, unhealed(tiny_ref.batch).logits)


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.gguf").write_text("plain text")
    with pytest.raises(AutosquashError, match="not a GGUF file"):
        gguf_architecture(tmp_path / "x.gguf")


def _every_value_type(path) -> None:
    """A GGUF file with a key of each value type, arrays of numbers, booleans and strings, and tensors in a
    float type, a block type and a K-quant type (2-D and 1-D)."""
    import numpy as np
    from gguf import GGUFWriter
    from gguf.constants import GGMLQuantizationType

    w = GGUFWriter(str(path), "llama")
    for name, value in (("uint8", 7), ("int8", -7), ("uint16", 700), ("int16", -700), ("uint32", 70_000)):
        getattr(w, f"add_{name}")(f"t.{name}", value)
    for name, value in (("int32", -70_000), ("uint64", 2**40), ("int64", -(2**40)), ("float64", 0.1)):
        getattr(w, f"add_{name}")(f"t.{name}", value)
    w.add_float32("t.float32", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.string", "héllo")
    w.add_array("t.ints", [3, 1, 2])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_array("t.bools", [True, False])
    w.add_array("t.strings", ["a", "", "ĠThe", "✓"])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(64).astype(np.float16))
    w.add_tensor("q8", rng.integers(0, 255, (2, 2 * 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("q4k", rng.integers(0, 255, (2, 144), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _agree(path) -> None:
    """autosquash's reader gives what the gguf package's reader gives: every key, type, shape and byte."""
    import numpy as np
    from gguf import GGUFReader

    from autosquash.formats.gguf import open_gguf

    ours, theirs = open_gguf(path), GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # its own header entries
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].contents() == field.contents() and ours.fields[key].types == tuple(field.types), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.shape, a.tensor_type, a.n_bytes) == (tuple(int(d) for d in b.shape), b.tensor_type, int(b.n_bytes))
        assert np.array_equal(a.data, np.ascontiguousarray(b.data).view(np.uint8).reshape(a.data.shape)), a.name


def test_the_header_reader_agrees_with_the_gguf_package(tmp_path):
    _every_value_type(tmp_path / "all.gguf")
    _agree(tmp_path / "all.gguf")


@pytest.mark.integration
def test_the_header_reader_agrees_with_the_gguf_package_on_the_shipped_model():
    from pathlib import Path

    from autosquash.models.load import _shipped_path

    _agree(Path(*_shipped_path("smollm2-135m")))  # written by llama.cpp: 49,152 tokens, 48,900 merges


def test_cut_and_foreign_gguf_files_are_one_line_errors(tmp_path):
    import struct

    from autosquash.formats.gguf import open_gguf

    _every_value_type(tmp_path / "all.gguf")
    whole = (tmp_path / "all.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-100])  # inside the last tensor's bytes
    with pytest.raises(AutosquashError, match="truncated or corrupt GGUF file.*q4k"):
        open_gguf(tmp_path / "cut.gguf")
    for version, what in ((struct.pack("<I", 1), "GGUF version 1"), (struct.pack(">I", 3), "big-endian")):
        (tmp_path / "other.gguf").write_bytes(whole[:4] + version + whole[8:])
        with pytest.raises(AutosquashError, match=what):
            open_gguf(tmp_path / "other.gguf")
