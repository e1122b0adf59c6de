"""`estimate` sizes an exported file's memory as llama.cpp allocates it: model buffer and KV cache exactly,
the whole within 10 %. Real SmolLM2-135M exports, loaded by llama-cpp-python, whose buffer lines are read."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import pytest

from autosquash.compress.plan import Plan
from autosquash.cost import estimate, file_tensors, load_phone
from autosquash.cost.model import kv_cells
from autosquash.export.build import BuiltModel
from autosquash.export.gguf_file import write_gguf
from autosquash.models.arch import Arch
from autosquash.models.load import load_model

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.integration

SPEC = "smollm2-135m"
MIB = 2**20


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 as F16 and as Q8_0 (types llama.cpp's CPU backend keeps as stored, without a repacked copy)."""
    base = load_model(SPEC)
    arch = Arch.from_config(base.config)
    out = {}
    for t in ("F16", "Q8_0"):
        out[t] = tmp_path_factory.mktemp(t) / "m.gguf"
        write_gguf(out[t], BuiltModel(SPEC, base, arch, Plan.uniform(arch, t), {}))
    return out


def llama_cpp_buffers(path: Path, log: Path, n_ctx: int, flash_attn: bool) -> dict:
    """Load `path` in llama.cpp and read back what it allocated (its log lines, in MiB with two decimals, and
    the model's tensor bytes exactly)."""
    # llama-cpp-python's log callback prints llama.cpp's lines to sys.stderr; a few come straight from C to fd 2.
    with log.open("w") as f, contextlib.redirect_stderr(f):
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=flash_attn, verbose=True
            )
            model_bytes = llama_cpp.llama_model_size(llm._model.model)
            llm.close()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    text = log.read_text()

    def mib(pattern: str) -> float:
        found = re.search(pattern, text)
        assert found, f"no line matching {pattern!r} in {log}"
        return float(found.group(1))

    kv = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells", text)
    assert kv, f"no KV cache line in {log}"
    return {
        "model_bytes": model_bytes,
        "model_mib": mib(r"CPU_Mapped model buffer size =\s+([\d.]+) MiB"),
        "kv_mib": float(kv.group(1)),
        "kv_cells": int(kv.group(2)),
        "compute_mib": mib(r"CPU compute buffer size =\s+([\d.]+) MiB"),
        "output_mib": mib(r"CPU\s+output buffer size =\s+([\d.]+) MiB"),
    }


@pytest.mark.parametrize("kind", ["F16", "Q8_0"])
@pytest.mark.parametrize(("context", "flash_attn"), [(1000, True), (2048, False)])  # rounding; attention branch
def test_estimate_sizes_memory_as_llama_cpp_allocates_it(exports, tmp_path, kind, context, flash_attn):
    path = exports[kind]
    phone = load_phone("iphone-16").model_copy(update={"flash_attention": flash_attn, "ubatch_tokens": 512})
    arch, tensors, kv_heads = file_tensors(path)
    ours = estimate(arch, tensors, phone, context_tokens=context, prompt_tokens=min(512, context))
    theirs = llama_cpp_buffers(path, tmp_path / "load.log", context, flash_attn)
    # Exact: the model buffer is the file's tensors (every SmolLM2 tensor is a whole number of 32-byte units, so
    # llama.cpp's alignment adds nothing); the KV cache is its cells (the context rounded up to 256) times F16
    # keys and values of every layer, which the log prints to 0.01 MiB.
    assert ours.weights_bytes == theirs["model_bytes"]
    assert round(ours.weights_bytes / MIB, 2) == theirs["model_mib"]
    assert theirs["kv_cells"] == kv_cells(context)
    assert round(ours.kv_cache_bytes / MIB, 2) == theirs["kv_mib"]
    assert round(ours.output_buffer_bytes / MIB, 2) == theirs["output_mib"]
    # The compute buffer's logits branch carries allocator slack (measured 2E+1 to 7E+1 floats per token: at most
    # 7 % above the estimate); the whole of llama.cpp's allocation, within 10 %.
    assert ours.compute_buffer_bytes / MIB == pytest.approx(theirs["compute_mib"], rel=0.075)
    total = theirs["model_mib"] + theirs["kv_mib"] + theirs["compute_mib"] + theirs["output_mib"]
    ours_total = (ours.peak_memory_bytes - phone.runtime_fixed_bytes) / MIB
    assert ours_total == pytest.approx(total, rel=0.10)
