"""Activation-aware quantization against plain rounding on real SmolLM2-135M layers.

Importance (E[x²] per input channel) comes from Wikipedia calibration text; the output error
||X Wq^T - X W^T|| / ||X W^T|| is measured on different (LAMBADA) activations, so the gain is not
an artefact of fitting the test data.

    .venv/bin/python benchmarks/activation_aware.py [--blocks 0,10,20,29]
"""

from __future__ import annotations

import argparse
import time

import torch

from autosquash.compress.calibrate import collect_inputs, collect_stats
from autosquash.compress.quantize import fake_quantize
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.formats.gguf_types import legal_type, tensor_type
from autosquash.models.load import load_model, load_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")
TYPES = ("Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,10,20,29")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    stats = collect_stats(model, token_block(tok, load_texts("wikipedia"), 2048, 256))
    names = [f"model.layers.{b}.{lin}" for b in args.blocks.split(",") for lin in LINEARS]
    inputs = collect_inputs(model, token_block(tok, load_texts("lambada"), 1024, 256), names)
    print(
        f"{'layer':32s} {'type':6s} {'bits/w':>6s} {'plain err':>10s} {'aware err':>10s} {'ratio':>6s} "
        f"{'plain s':>8s} {'aware s':>8s}"
    )
    wins = {t: 0 for t in TYPES}
    ratios = {t: [] for t in TYPES}
    for name in names:
        w = model.get_submodule(name).weight.data
        x = inputs[name]
        ref = x @ w.T
        for t in TYPES:
            qtype = legal_type(t, w.shape[1])
            t0 = time.perf_counter()
            plain = fake_quantize(w, qtype)
            t1 = time.perf_counter()
            aware = fake_quantize(w, qtype, stats[name])
            t2 = time.perf_counter()
            e_plain = ((x @ plain.T - ref).norm() / ref.norm()).item()
            e_aware = ((x @ aware.T - ref).norm() / ref.norm()).item()
            wins[t] += e_aware < e_plain
            # SmolLM2 ships on a Q4_1 grid, so plain Q4_1 re-quantization can be exact (error 0).
            ratio = e_aware / e_plain if e_plain > 0 else float("nan")
            if e_plain > 0:
                ratios[t].append(ratio)
            bits = tensor_type(qtype).bits_per_weight
            print(
                f"{name:32s} {qtype:6s} {bits:6.2f} {e_plain:10.5f} {e_aware:10.5f} {ratio:6.3f} "
                f"{t1 - t0:8.3f} {t2 - t1:8.3f}"
            )
    print("\nactivation-aware wins (lower output error than plain rounding), per asked type:")
    for t in TYPES:
        if not ratios[t]:
            print(f"  {t:5s} plain rounding is exact on all {len(names)} layers (the weights ship on this grid)")
            continue
        mean = sum(ratios[t]) / len(ratios[t])
        print(f"  {t:5s} {wins[t]:2d}/{len(names)} layers, mean error ratio aware/plain {mean:.3f}")


if __name__ == "__main__":
    main()
