"""GGUF files of every family as inputs, good and bad: a file llama.cpp's converter would write reads (Phi-3's fused
q/k/v too); a truncated file, a header that contradicts its tensors and an architecture autosquash does not read are
one line and a non-zero exit from every subcommand, before anything is priced or loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType

from autosquash.cli import main
from autosquash.compress.apply import compress
from autosquash.compress.plan import Plan
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.gguf import open_gguf
from autosquash.models.arch import Arch
from autosquash.models.gguf_family import FAMILIES
from autosquash.models.load import load_model
from tests.conftest import TINY_SHAPE


def _export(tmp_path, model_type: str):
    cfg = {**TINY_SHAPE, "model_type": model_type, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}
    if model_type.startswith("gemma"):
        cfg["query_pre_attn_scalar"] = TINY_SHAPE["head_dim"]
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps(cfg))
    model = load_model(str(spec), seed=0)
    arch = Arch.from_config(model.config)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(path, BuiltModel(str(spec), model, arch, Plan.uniform(arch, "Q8_0"), {}))
    return path, model, arch


def _rewrite(src, dst, fields=None, tensors=None) -> None:
    """`src` copied to `dst` with some keys replaced (key -> value) and its tensors passed through `tensors`
    (a function of the name -> bytes dict, returning the (name, type, bytes, ggml shape) to write)."""
    reader = open_gguf(src)
    arch = reader.fields["general.architecture"].value
    w = GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key in ("general.architecture", "GGUF.version"):
            continue
        value = (fields or {}).get(key, field.value)
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, field.types[0])
    rows = [(t.name, t.tensor_type, t.data, t.shape) for t in reader.tensors]
    for name, ttype, data, shape in tensors(rows) if tensors else rows:
        data = np.ascontiguousarray(data)
        if ttype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):  # plain floats, in numpy's order
            data = data.view(np.float32 if ttype == GGMLQuantizationType.F32 else np.float16)
            data = data.reshape(tuple(reversed(shape)))
        w.add_tensor(name, data, raw_dtype=ttype)  # blocks: (rows, bytes per row), the shape follows
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fails(capsys, argv: list[str], match: str) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_bad_files_of_each_family_are_one_line_errors(tmp_path, capsys, model_type):
    path, _, _ = _export(tmp_path, model_type)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    estimate = ["estimate", "--model", str(cut), "--phone", "iphone-16"]
    for argv in (estimate, ["eval", "--model", str(cut), "--text", "lambada"]):
        _fails(capsys, argv, "truncated or corrupt GGUF file")
    arch = FAMILIES[model_type].gguf_arch
    wide = tmp_path / "wide.gguf"  # the header's FFN width edited: llama.cpp would refuse to load the file
    _rewrite(path, wide, fields={f"{arch}.feed_forward_length": 768})
    _fails(capsys, ["estimate", "--model", str(wide), "--phone", "iphone-16"], "the header and the tensors disagree")
    with pytest.raises(AutosquashError, match="disagree"):
        load_model(str(wide))


def test_an_architecture_autosquash_does_not_read_names_those_it_does(tmp_path, capsys):
    path, _, _ = _export(tmp_path, "llama")
    other = tmp_path / "bert.gguf"
    _rewrite(path, other)
    data = bytearray(other.read_bytes())
    at = data.index(b"llama")  # general.architecture's value, the file's first key
    data[at : at + 5] = b"bertz"
    other.write_bytes(bytes(data))
    _fails(capsys, ["estimate", "--model", str(other), "--phone", "iphone-16"], "GGUF architecture 'bertz'")


def test_a_phi3_file_with_fused_qkv_reads_as_the_converter_writes_it(tmp_path):
    """llama.cpp's converter writes Phi-3's qkv_proj as one attn_qkv tensor; autosquash splits it back."""
    path, model, arch = _export(tmp_path, "phi3")
    fused = tmp_path / "fused.gguf"

    def fuse(rows):
        by_name = {name: (ttype, data, shape) for name, ttype, data, shape in rows}
        out = []
        for name, ttype, data, shape in rows:
            if name.endswith("attn_q.weight"):
                parts = [by_name[name.replace("attn_q", p)] for p in ("attn_q", "attn_k", "attn_v")]
                stacked = np.concatenate([p[1] for p in parts])
                out.append((name.replace("attn_q", "attn_qkv"), ttype, stacked, (shape[0], stacked.shape[0])))
            elif not name.endswith(("attn_k.weight", "attn_v.weight")):
                out.append((name, ttype, data, shape))
        return out

    _rewrite(path, fused, tensors=fuse)
    assert any(
        t.name == "blk.0.attn_qkv.weight" and t.tensor_type == GGMLQuantizationType.Q8_0
        for t in open_gguf(fused).tensors
    )
    ids = torch.randint(3, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = compress(model, arch, Plan.uniform(arch, "Q8_0"), {})(ids).logits
        assert torch.equal(load_model(str(fused))(ids).logits, want)


def test_partial_rotary_files_are_refused_rather_than_rotated_whole(tmp_path, capsys):
    """Phi-4-mini turns 3/4 of each head; read as Phi-3 it would be rotated whole: refused in one line."""
    path, _, _ = _export(tmp_path, "phi3")
    partial = tmp_path / "partial.gguf"
    _rewrite(path, partial, fields={"phi3.rope.dimension_count": 48})
    _fails(capsys, ["estimate", "--model", str(partial), "--phone", "iphone-16"], "rope turns 48 of each head's 64")


def test_a_gguf_whose_tokenizer_cannot_be_built_is_one_line_naming_the_file(tmp_path, capsys):
    """Merges naming tokens the vocabulary lacks: the tokenizers library raises a bare Exception, once a traceback."""
    path, _, _ = _export(tmp_path, "llama")
    merges = open_gguf(path).fields["tokenizer.ggml.merges"].value
    broken = tmp_path / "broken.gguf"
    _rewrite(path, broken, fields={"tokenizer.ggml.merges": ["zzqq xxyy", *merges]})
    _fails(
        capsys,
        ["eval", "--model", str(broken), "--text", "lambada"],
        f"{broken}: its tokenizer cannot be built (Error while initializing BPE: Token `zzqq` out of vocabulary)",
    )
