"""A trial as the runner builds it (compress, then heal), on the shared tiny random Llama."""

from pathlib import Path

import pytest

from autosquash.compress.apply import VariantCache, compress
from autosquash.evaluate.heal import HealConfig, heal
from autosquash.evaluate.proxy import reference
from autosquash.search.trial import merges_adapter


@pytest.fixture
def tiny_spec() -> str:
    """Stands for the tiny model's spec: a config.json borrows SmolLM2's tokenizer, which GGUF files copy."""
    return str(Path(__file__).parents[2] / "experiments/tiny-llama.json")


@pytest.fixture
def tiny_ref(tiny_model, tiny_batch):
    return reference(tiny_model, tiny_batch, k=8)


@pytest.fixture
def make_trial(tiny_model, tiny_arch, tiny_ref):
    """plan -> (the trial's model, its variant cache): healed for 2 steps, merged when the plan is all F16."""

    def build(plan, steps: int = 2):
        cache = VariantCache(max_bytes=1 << 62)
        model = compress(tiny_model, tiny_arch, plan, {}, cache)
        cfg = HealConfig(steps=steps, rank=4, lr=3e-3, batch_seqs=2, only_if_better=False)  # always an adapter
        model, _ = heal(model, tiny_ref, cfg, seed=7, merge=merges_adapter(tiny_arch, plan))
        return model, cache

    return build


def llama_cpp_logits(path, ids: list[int], lora=None):
    """llama.cpp's float64 logits of every position of `ids` from a GGUF file, with a GGUF LoRA adapter where one
    is given (one thread, an F32 KV cache: as torch keeps keys and values)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        lora_path=None if lora is None else str(lora),
        n_ctx=len(ids),
        logits_all=True,
        n_threads=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
