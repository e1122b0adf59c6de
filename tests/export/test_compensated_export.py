"""A search with `calibration.error_compensation: gptq`: its trials build compensated variants (their own
cache keys), and a plan exports to a GGUF file that reads back bitwise to the weights the trial scored."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from autosquash.compress.apply import VariantCache, compress, quantized_tensors
from autosquash.compress.calibrate import Stats, compensation_of
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.formats.codecs import QuantizedTensor
from autosquash.formats.gguf import open_gguf
from autosquash.search.experiment import load_experiment
from autosquash.search.trial import build_plan, load_inputs, prepare_context

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as a search's worker on a small machine runs: compensation's column sweep is many
    small ops, which contended OpenMP threads slow many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compensated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compensated")
    experiment = {
        "name": "gptq-check",
        "model": str(ROOT / "experiments/tiny-llama.json"),
        "phone": "iphone-16",
        "search_space": str(ROOT / "search_spaces/gguf-mixed.yaml"),
        "context_tokens": 512,
        "calibration": {
            "source": "wikipedia",
            "tokens": 512,
            "seq_len": 128,
            "error_compensation": "gptq",
            "compensation_tokens": 1024,
        },
        "evaluation": {"source": "lambada", "tokens": 256, "seq_len": 128},
        "topk": 16,
        "heal": {"steps": 0},
    }
    (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    exp = load_experiment(folder / "experiment.yaml")
    inputs = load_inputs(exp, folder / "run")
    return exp, inputs, prepare_context(exp, inputs, workers=1), folder


def _plan() -> Plan:
    return Plan(
        embed_quant="Q8_0",
        groups={
            "blk.0.attn": LayerChoice(quant="Q3_K", tensor_quant={"attn_v": "Q6_K"}),
            "blk.0.ffn": LayerChoice(quant="Q2_K"),
            "blk.1.attn": LayerChoice(quant="IQ4_NL"),
            "blk.1.ffn": LayerChoice(quant="Q4_0", ffn_keep_ratio=0.5),
        },
    )


def test_the_option_sets_compensation_and_its_variants_are_their_own(compensated):
    exp, inputs, _, _ = compensated
    comp = compensation_of(inputs.stats)
    assert comp is not None and comp.damp == exp.calibration.compensation_damp == 0.1 and comp.method == "gptq"
    plain_stats = Stats(inputs.stats)  # the same statistics without compensation
    cache = VariantCache(max_bytes=1 << 30)
    plan = _plan()
    compensated_parts = {n: v for n, _, v in quantized_tensors(inputs.base, inputs.arch, plan, inputs.stats, cache)}
    plain_parts = {n: v for n, _, v in quantized_tensors(inputs.base, inputs.arch, plan, plain_stats, cache)}
    keys = list(cache._items)
    assert len(keys) == len(set(keys))
    assert sum("gptq" in k for k in keys) == 7 * inputs.arch.n_layers  # every block linear, once each way
    for name, variant in compensated_parts.items():
        q, p = variant.parts["weight"], plain_parts[name].parts["weight"]
        assert isinstance(q, QuantizedTensor) and q.type == p.type and q.data.shape == p.data.shape
        if name.startswith("blk."):
            assert (q.data != p.data).any(), name
        else:
            assert (q.data == p.data).all(), name  # the token table has no inputs to compensate for


def test_a_compensated_trial_exports_the_weights_it_scored(compensated, tmp_path):
    exp, inputs, ctx, _ = compensated
    plan = _plan().model_copy(update={"groups": {**_plan().groups, "blk.1.ffn": LayerChoice(quant="Q4_0")}})
    cache = VariantCache(max_bytes=1 << 30)
    model, _ = build_plan(ctx, plan, seed=0, cache=cache)
    path = tmp_path / "m.gguf"
    write_gguf(path, BuiltModel(exp.model, inputs.base, inputs.arch, plan, inputs.stats, cache=cache, model=model))
    types = {t.name: t.tensor_type.name for t in open_gguf(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q2_K" and types["blk.1.attn_q.weight"] == "IQ4_NL"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[name]), name  # bitwise: the file holds what the trial scored
    # And a fresh build (a new cache, as an export of the search rebuilds it) makes the same bytes.
    again = compress(inputs.base, inputs.arch, plan, inputs.stats, VariantCache(max_bytes=0))
    for name, p in again.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_compensation_is_off_unless_asked_for():
    exp = load_experiment(ROOT / "experiments/smollm2-135m-iphone16.yaml")
    assert exp.calibration.error_compensation == "none"
