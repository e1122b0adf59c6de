"""IQ4_NL (llama.cpp's non-linear 4-bit grid) against Q4_0 at the same 4.5 bits on real SmolLM2-135M.

Importance (E[x²] per input channel) from the default calibration (2048 Wikipedia tokens); per linear, the
output error E||(W - Ŵ)x||² / E||Wx||² under those statistics; per uniform plan (token table Q8_0), the KL to
the base model on 2048 held-out LAMBADA tokens; then the token table alone in either type, blocks at Q8_0.
Caveat: SmolLM2 ships on a Q4_1 grid, which Q4_1 re-quantizes losslessly and neither type here does.

    .venv/bin/python benchmarks/iq4_vs_q4_0.py       # writes benchmarks/results/iq4_vs_q4_0.txt/json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402

SPEC = "smollm2-135m"
TYPES = ("Q4_0", "IQ4_NL")
PLANS = ("Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_1")  # uniform blocks (IQ4_XS: IQ4_NL but on ffn_down)


def run() -> dict:
    from autosquash.compress.apply import compress
    from autosquash.compress.calibrate import collect_stats
    from autosquash.compress.plan import Plan, deployed_tensors
    from autosquash.compress.quantize import fake_quantize
    from autosquash.evaluate.proxy import reference, score
    from autosquash.evaluate.texts import load_texts, token_block
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_model, load_tokenizer

    torch.set_num_threads(1)
    base, tok = load_model(SPEC), load_tokenizer(SPEC)
    arch = Arch.from_config(base.config)
    stats = collect_stats(base, token_block(tok, load_texts("wikipedia"), 2048, 256))
    ref = reference(base, token_block(tok, load_texts("lambada"), 2048, 256))

    ratios = []
    for i, layer in enumerate(base.model.layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                w, sq = m.weight.data.float(), stats[f"model.layers.{i}.{name}"]
                err = [
                    float(((fake_quantize(w, t, sq) - w).square() * sq).sum() / (w.square() * sq).sum()) for t in TYPES
                ]
                ratios.append(err[1] / err[0])
    ratios.sort()
    out = {
        "linears": len(ratios),
        "iq4_nl_lower_error": sum(r < 1 for r in ratios),
        "error_ratio_median": ratios[len(ratios) // 2],
        "error_ratio_max": ratios[-1],
        "plans": [],
    }

    def scored(label: str, plan: Plan) -> None:
        mb = sum(t.nbytes for t in deployed_tensors(arch, plan)) / 1e6
        out["plans"].append({"plan": label, "mb": mb, **score(compress(base, arch, plan, stats), ref)})
        print(json.dumps(out["plans"][-1]), flush=True)

    for quant in PLANS:
        scored(f"blocks {quant}, table Q8_0", Plan.uniform(arch, quant, embed_quant="Q8_0"))
    for quant in TYPES:
        scored(f"blocks Q8_0, table {quant}", Plan.uniform(arch, "Q8_0", embed_quant=quant))
    return out


def report(out: dict) -> str:
    body = [[p["plan"], f"{p['mb']:.1f}", f"{p['kl']:.4f}", f"{p['perplexity']:.2f}"] for p in out["plans"]]
    note = (
        f"IQ4_NL's output error below Q4_0's on {out['iq4_nl_lower_error']} of {out['linears']} linears (ratio median "
        f"{out['error_ratio_median']:.2f}, max {out['error_ratio_max']:.2f}). KL and perplexity on 2048 held-out "
        "LAMBADA tokens; importance from 2048 Wikipedia tokens. SmolLM2 ships on a Q4_1 grid (so Q4_1 is lossless)."
    )
    return table(["plan", "MB", "KL", "perplexity"], body) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for iq4_vs_q4_0.txt/json")
    args = p.parse_args()
    out = run()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "iq4_vs_q4_0.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "iq4_vs_q4_0.txt").write_text(report(out))
    print(report(out))


if __name__ == "__main__":
    main()
