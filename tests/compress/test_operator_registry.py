"""Adding an operator is one new module plus its registry line: a toy form, added to a copy of the package
exactly that way, is planned, priced, applied, cached, measured by the sensitivity model and written and
read back in the torch format without any other edit."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import autosquash

TOY = '''"""A toy form for the registry test: each row scaled to unit max, the scales kept in F32."""

from __future__ import annotations

import torch

from autosquash.compress.operators.base import ChoiceField, Form, TensorSpec, matrix_spec
from autosquash.compress.quantize import quantize


class ScaledLinear(torch.nn.Module):
    def __init__(self, weight, row_scale):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.row_scale = row_scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.row_scale


class RowScale(Form):
    name = "row_scale"
    what = "row-scaled matrices"
    gguf = False
    fields = (ChoiceField("row_scale", int, 0, {"ge": 0, "le": 1}),)
    suffixes = ("weight", "row_scale")

    def size(self, out_features, in_features, choice):
        return choice.row_scale

    def tensors(self, name, out_f, in_f, quant, size):
        return [matrix_spec(f"{name}.weight", out_f, in_f, quant, out_f * in_f),
                TensorSpec(f"{name}.row_scale", (out_f,), "F32", out_f)]

    def compress(self, weight, deploy, input_sq):
        scale = weight.abs().amax(1).clamp_min(1e-8)
        return {"weight": quantize(weight / scale[:, None], deploy.type_of("weight"), input_sq), "row_scale": scale}

    def module(self, parts):
        return ScaledLinear(parts["weight"], parts["row_scale"])

    def dense(self, parts):
        return parts["weight"] * parts["row_scale"][:, None]


OPERATOR = RowScale()
'''

SCRIPT = """
import torch, optuna
from transformers import LlamaConfig, LlamaForCausalLM
from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.plan import deployed_tensors
from autosquash.cost import estimate, load_phone
from autosquash.evaluate.proxy import reference
from autosquash.export.build import BuiltModel
from autosquash.export.torch_file import load, save
from autosquash.models.arch import Arch
from autosquash.search.profile import measure_profile
from autosquash.search.space import SearchSpace

torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=512, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
arch = Arch.from_config(model.config)
batch = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
stats = collect_stats(model, batch)
space = SearchSpace.model_validate({"name": "toy", "target": "torch", "attn": {"quant": ["Q8_0"]},
                                    "ffn": {"quant": ["Q4_0"], "row_scale": [0, 1]}})
params = {f"blk.{i}.ffn.row_scale": 1 for i in range(2)}
plan = space.sample(optuna.trial.FixedTrial(params), arch)
assert plan.choice("blk.1.ffn").row_scale == 1
tensors = {t.name: t for t in deployed_tensors(arch, plan)}
assert tensors["blk.1.ffn_up.row_scale"].shape == (512,)
cache = VariantCache()
built = compress(model, arch, plan, stats, cache)
assert type(built.model.layers[0].mlp.up_proj).__name__ == "ScaledLinear"
unscaled = deployed_tensors(arch, space.sample(optuna.trial.FixedTrial({k: 0 for k in params}), arch))
cost = estimate(arch, list(tensors.values()), load_phone("iphone-16"), context_tokens=1024)
plain = estimate(arch, unscaled, load_phone("iphone-16"), context_tokens=1024)
# The scales are priced: F32 per output row of gate (512), up (512) and down (256) in both blocks.
assert cost.weights_bytes - plain.weights_bytes == 2 * (512 + 512 + 256) * 4
save("toy.safetensors", BuiltModel("tiny", model, arch, plan, stats, cache=cache))
loaded, _ = load("toy.safetensors")
with torch.no_grad():
    assert torch.equal(loaded(batch).logits, built(batch).logits)
ref = reference(model, batch, 8)
profile = measure_profile(model, arch, space, stats, ref, 64, log=lambda *a, **k: None)
ffn = profile.groups[1]
assert [o["row_scale"] for o in ffn.options] == [0, 1] and all(d >= 0 for d in ffn.damage), ffn
print("TOY OK")
"""


def test_a_toy_operator_is_one_module_and_one_registry_line(tmp_path):
    src = Path(autosquash.__file__).parent
    pkg = tmp_path / "autosquash"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "compress/operators/toy.py").write_text(TOY)
    registry = pkg / "compress/operators/__init__.py"
    before = registry.read_text()
    after = before.replace('"svd", "kron")', '"svd", "kron", "toy")')
    registry.write_text(after)
    changed = [
        d
        for d in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if d.startswith(("+", "-")) and not d.startswith(("+++", "---"))
    ]
    assert len(changed) == 2, changed  # one line out, one line in
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "TOY OK" in run.stdout, run.stderr[-3000:]
