"""The torch format for a plan's model: what GGUF cannot hold (low-rank and Kronecker factors, pruned
sublayers, a LoRA adapter), in autosquash.formats.torch_file's container.

Tensors are named as deployed (`blk.3.attn_q.lr_a`, `blk.3.ffn_up.kron_a`, `blk.3.attn_q.weight.lora_a`,
...): each linear's parts as its form (compress/operators) stores them, so the file is the size the cost
model prices and decodes to the very float weights its trial evaluated. The metadata holds the plan, the
base model's config and spec (whose tokenizer the model uses), and the LoRA alpha.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autosquash.compress.apply import quantized_tensors, shape_sublayers
from autosquash.compress.operators import FORMS, PRUNING
from autosquash.compress.plan import SUBLAYERS, Plan
from autosquash.compress.quantize import quantize
from autosquash.errors import AutosquashError
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import merged_weights
from autosquash.export.lora import adapter_weights, apply_adapter
from autosquash.formats import torch_file as container
from autosquash.formats.codecs import QuantizedTensor
from autosquash.models.arch import Arch
from autosquash.models.layers import with_bias


def save(path: str | Path, built: BuiltModel) -> dict[str, int]:
    """Write `built` (a plan applied to its base model) to `path` in the torch format; returns the count of tensors
    per type.

    `built.model` is the plan's model as its trial evaluated it (compress, then heal): a merged adapter's F16
    weights are taken from it, a kept adapter is stored beside the weights (None: no healing).
    """
    base, arch, plan, model = built.base, built.arch, built.plan, built.model
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    merged = merged_weights(model)
    params = set() if model is None else {n for n, _ in model.named_parameters()}
    for name, module, variant in quantized_tensors(base, arch, plan, built.stats, built.cache):
        for suffix, part in variant.parts.items():
            # A part's module parameter: the linear's own weight, or its `suffix` submodule's (LowRankLinear).
            param = f"{module}.weight" if suffix == "weight" else f"{module}.{suffix}.weight"
            if merged is not None and name.startswith("blk.") and param in params:
                part = merged(param, part)
            tensors[f"{name}.{suffix}"] = part
    layers = base.model.layers
    for i in range(arch.n_layers):
        for kind, _ in SUBLAYERS:
            op = PRUNING[kind]
            if op.kept(arch, plan.choice(f"blk.{i}.{kind}")):
                for norm, module_path, _ in arch.norms(kind):
                    tensors[f"blk.{i}.{norm}.weight"] = layers[i].get_submodule(module_path).weight
    tensors["output_norm.weight"] = base.model.norm.weight
    adapter, alpha = adapter_weights(model) if model is not None else ({}, 0.0)
    for name, (a, b) in adapter.items():
        tensors[f"{name}.lora_a"] = quantize(a, "F16")  # healing rounded A and B to F16: exact
        tensors[f"{name}.lora_b"] = quantize(b, "F16")
    metadata = {
        "base_model": built.base_spec,
        "config": base.config.to_json_string(use_diff=False),
        "plan": plan.model_dump_json(),
        "lora_alpha": json.dumps(alpha if adapter else None),
    }
    return container.write(path, tensors, metadata)


def load(path: str | Path) -> tuple[torch.nn.Module, str]:
    """The float32 model (eval mode) of a torch-format file, as its trial evaluated it, and the spec of the
    base model whose tokenizer it uses."""
    from transformers import AutoModelForCausalLM

    stored = container.Stored(path)
    meta = stored.metadata
    config = container.read_config(meta)
    plan = Plan.model_validate_json(meta["plan"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = Arch.from_config(config)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            _fill_block(block, i, arch, plan, stored)
        model.model.embed_tokens.weight.data = stored["token_embd.weight"]
        if not arch.tied_embeddings:
            model.lm_head.weight.data = stored["output.weight"]
        model.model.norm.weight.data = stored["output_norm.weight"]
    model.eval()
    alpha = json.loads(meta.get("lora_alpha", "null"))
    if alpha is not None:
        names = sorted({n.removesuffix(".lora_a") for n in stored.raw if n.endswith(".lora_a")})
        model = apply_adapter(model, {n: (stored[f"{n}.lora_a"], stored[f"{n}.lora_b"]) for n in names}, alpha)
    return model, meta["base_model"]


def _fill_block(block, i: int, arch: Arch, plan: Plan, stored: container.Stored) -> None:
    """Block `i` rebuilt as compress() built it: removed sublayers and widths, norms, each linear in its form."""
    shape_sublayers(block, i, arch, plan)
    for kind, linears in SUBLAYERS:
        op = PRUNING[kind]
        if not op.kept(arch, plan.choice(f"blk.{i}.{kind}")):
            continue  # a removed sublayer: no norm, no linears
        for norm, module_path, _ in arch.norms(kind):
            block.get_submodule(module_path).weight.data = stored[f"blk.{i}.{norm}.weight"]
        for short, path in linears:
            name = f"blk.{i}.{short}"
            present = {x for f in FORMS for x in f.suffixes if f"{name}.{x}" in stored}
            # The form holding exactly these parts (some are optional: a Kronecker fit without column scale).
            fits = [f for f in FORMS if f.suffixes[0] in present and present <= set(f.suffixes)]
            if not fits:
                raise AutosquashError(f"{stored.path}: {name} is stored as {sorted(present)}, which no form holds")
            form = min(fits, key=lambda f: len(f.suffixes))
            parts = {s: stored[f"{name}.{s}"] for s in form.suffixes if f"{name}.{s}" in stored}
            bias = stored[f"{name}.bias"] if f"{name}.bias" in stored else None
            parent, attr = path.rsplit(".", 1)
            block.get_submodule(parent).register_module(attr, with_bias(form.module(parts), bias))
