"""The families people put on phones, from tiny random configs: load, price exactly, compress, heal, score,
and round-trip through the torch format; GGUF export where llama.cpp's llama graph runs them, a one-line
refusal where it does not."""

import json
import math
from pathlib import Path

import pytest
import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.cost import estimate, load_phone
from autosquash.errors import AutosquashError
from autosquash.evaluate.heal import HealConfig, heal
from autosquash.evaluate.proxy import reference, score
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import gguf_arch
from autosquash.export.torch_file import load, save
from autosquash.models.arch import SUPPORTED_MODEL_TYPES, Arch
from autosquash.models.gguf_family import FAMILIES as GGUF_FAMILIES
from autosquash.models.load import load_model
from tests.conftest import TINY_SHAPE

CONFIGS = Path(__file__).parents[1] / "cost/configs"
TINY = dict(TINY_SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # ids inside the tiny vocabulary
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]  # phi3 loads as a Llama
PLAN = Plan(
    target="torch",
    embed_quant="Q8_0",
    groups={
        "blk.0.attn": LayerChoice(quant="Q4_K", attn_keep_ratio=0.5),
        "blk.0.ffn": LayerChoice(quant="Q4_0", ffn_keep_ratio=0.5),
        "blk.1.attn": LayerChoice(quant="Q8_0", rank_ratio=0.25),
        "blk.1.ffn": LayerChoice(quant="Q2_K"),
    },
)


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path):
    """(config.json path, the seeded random model it loads as, its Arch)."""
    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({"model_type": request.param, **TINY}))
    model = load_model(str(spec), seed=0)
    with torch.no_grad():  # norms and biases unlike their initial values: one a file forgot would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
            elif name.endswith("bias"):
                p.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    return str(spec), model, Arch.from_config(model.config)


def test_every_family_in_the_list_is_tested():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def test_priced_tensors_are_every_weight_of_the_model(family):
    """The unpruned plan prices exactly the model's parameters, norms of every family included."""
    _, model, arch = family
    priced = deployed_tensors(arch, Plan.uniform(arch, "F16"))
    assert sum(math.prod(t.shape) for t in priced) == sum(p.numel() for p in model.parameters())
    norms = [t for t in priced if "norm" in t.name and t.name.startswith("blk.0.")]
    assert len(norms) == sum(1 for n, _ in model.model.layers[0].named_parameters() if "norm" in n)


def test_a_mixed_plan_compresses_heals_scores_and_reloads(family, tmp_path):
    spec, model, arch = family
    batch = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = reference(model, batch, k=8)
    cache = VariantCache(max_bytes=1 << 62)
    compressed = compress(model, arch, PLAN, {}, cache)
    healed, info = heal(compressed, ref, HealConfig(steps=2, rank=4, lr=1e-3, batch_seqs=2), seed=0)
    assert info["heal_steps"] == 2
    quality = score(healed, ref)
    assert 0 < quality["kl"] < 5 and quality["perplexity"] > 1
    path = tmp_path / "m.safetensors"
    save(path, BuiltModel(spec, model, arch, PLAN, {}, cache=cache, model=healed))
    loaded, _ = load(path)
    with torch.no_grad():  # every norm stored and put back: the reloaded model computes the trial's logits
        assert torch.equal(loaded(batch).logits, healed(batch).logits)


def test_per_layer_shapes_go_to_deci_only_where_the_llama_graph_runs_the_family(family):
    """Every family writes its own graph; blocks of different widths need `deci`, which only computes the families
    llama.cpp's llama graph runs, so the others refuse such a plan in one line (and take a uniformly pruned one)."""
    _, _, arch = family
    fam = GGUF_FAMILIES[arch.model_type]
    assert gguf_arch(arch, Plan.uniform(arch, "Q8_0")) == fam.gguf_arch
    alike = Plan(groups={f"blk.{i}.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.5) for i in range(2)})
    assert gguf_arch(arch, alike) == fam.gguf_arch
    if fam.llama_graph:
        assert gguf_arch(arch, PLAN) == "deci"
    else:
        with pytest.raises(AutosquashError, match="sizes every block's tensors from block 0's"):
            gguf_arch(arch, PLAN)


@pytest.mark.parametrize("name", ["Qwen2.5-1.5B", "Qwen3-1.7B", "Gemma-2-2B", "Gemma-3-1B", "Phi-3-mini-4k"])
def test_estimate_from_a_real_config(name):
    """Published configs price to the parameter count transformers builds from them (on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = Arch.from_json(CONFIGS / name)
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    tensors = deployed_tensors(arch, Plan.uniform(arch, "Q4_K"))
    assert sum(math.prod(t.shape) for t in tensors) == sum(p.numel() for p in model.parameters())
    report = estimate(arch, tensors, load_phone("pixel-9-pro"), context_tokens=2048)
    assert report.weights_bytes < sum(p.numel() for p in model.parameters())  # Q4_K: under a byte a weight
    assert report.decode_tokens_per_s > 0


def test_phi3_loads_as_the_llama_it_is(tmp_path):
    """Split q/k/v and gate/up compute Phi-3's logits (to float rounding: three matmuls instead of one)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(**TINY)).eval()
    from autosquash.models.phi3 import as_llama

    llama = as_llama(phi3)
    # It computes as a Llama and exports as phi3 (its config keeps the family).
    assert type(llama).__name__ == "LlamaForCausalLM" and Arch.from_config(llama.config).model_type == "phi3"
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi3(ids).logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in llama.parameters()) == sum(p.numel() for p in phi3.parameters())


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_theta": 10000.0, "partial_rotary_factor": 0.75, "rope_type": "default"}, "partial rotary"),
        (
            {"rope_theta": 10000.0, "rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32},
            "longrope",
        ),
    ],
)
def test_phi3_variants_llama_would_compute_differently_are_refused(tmp_path, rope, message):
    spec = tmp_path / "config.json"
    cfg = {"model_type": "phi3", **TINY, "rope_parameters": rope, "original_max_position_embeddings": 128}
    spec.write_text(json.dumps(cfg))
    with pytest.raises(AutosquashError, match=message):
        load_model(str(spec))
