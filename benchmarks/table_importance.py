"""The token table quantized plainly, weighted by the output head's input, and with that input's error
compensation (GPTQ), on real SmolLM2-135M.

SmolLM2 ties its output head to the token table, so the table's error reaches the logits as (W - Ŵ) h, h
the final norm's output, whose channels' E[h²] differ by a factor of about 300. autosquash quantizes a
table the head reads weighted by E[h²] from the calibration text (each block kept as the reference encoding
where that errs less by that weight), as llama.cpp's importance matrix weighs token_embd, and spreads each
column's error onto the columns not yet coded through E[h hᵀ] (compress.gptq; each row kept as the weighted
encoding where that errs less by E[h hᵀ]). Per table type of the default search space, with every block as
shipped: the KL to the base model on the default experiment's test split (2048 LAMBADA tokens after its
evaluation set, never selected on), all three ways.

    .venv/bin/python benchmarks/table_importance.py   # writes benchmarks/results/table_importance.txt/json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import DEFAULT_EXPERIMENT, table  # noqa: E402


def run() -> dict:
    from autosquash.compress.apply import quantized_table
    from autosquash.compress.calibrate import HEAD, HEAD_COVARIANCE
    from autosquash.compress.plan import Plan, deployed_tensors
    from autosquash.evaluate.proxy import reference, score
    from autosquash.formats.codecs import dequantize
    from autosquash.search.experiment import load_experiment
    from autosquash.search.space import SearchSpace
    from autosquash.search.trial import load_inputs

    torch.set_num_threads(2)
    exp = load_experiment(DEFAULT_EXPERIMENT)
    space = SearchSpace.load(exp.search_space)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = load_inputs(exp, Path(tmp))
    base, arch, stats = inputs.base, inputs.arch, inputs.stats
    ref = reference(base, inputs.test, exp.topk)
    emb = base.model.embed_tokens.weight
    shipped = emb.data
    head = stats[HEAD]
    out = {"head_input_max_over_median": float(head.max() / head.median()), "tables": []}
    for quant in space.embed_quant:
        row = {"type": quant}
        plan = Plan(embed_quant=quant)
        row["mb"] = sum(t.nbytes for t in deployed_tensors(arch, plan) if t.name == "token_embd.weight") / 1e6
        weighted = {k: v for k, v in stats.items() if k != HEAD_COVARIANCE}
        for label, importance in (("plain", {}), ("weighted", weighted), ("compensated", stats)):
            try:
                emb.data = dequantize(quantized_table(base, arch, "token_embd", quant, importance), emb.device)
                row[f"{label}_kl"] = max(score(base, ref)["kl"], 0.0)
            finally:
                emb.data = shipped
        out["tables"].append(row)
        print(json.dumps(row), flush=True)
    return out


def report(out: dict) -> str:
    body = []
    for r in out["tables"]:
        kls = [r["plain_kl"], r["weighted_kl"], r["compensated_kl"]]
        ratio = f"{r['compensated_kl'] / r['plain_kl']:.2f}" if r["plain_kl"] > 0 else "-"
        body.append([r["type"], f"{r['mb']:.1f}", *(f"{k:.5f}" for k in kls), ratio])
    note = (
        "KL to the base model on the default experiment's test split (2048 LAMBADA tokens), every block as shipped; "
        f"weights E[h²] of the head's input from its calibration (2048 Wikipedia tokens), max/median "
        f"{out['head_input_max_over_median']:.0f}; compensated spreads the error through E[h hᵀ] from the same "
        "tokens (GPTQ, damp 0.1). The shipped table is Q8_0: Q8_0 re-quantizes it exactly. ratio: compensated/plain."
    )
    return table(["table", "MB", "plain KL", "weighted KL", "compensated KL", "ratio"], body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for table_importance.txt/json")
    args = p.parse_args()
    out = run()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "table_importance.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "table_importance.txt").write_text(report(out))
    print(report(out))


if __name__ == "__main__":
    main()
