"""GPTQ-style error compensation inside the GGUF grids against plain importance-weighted quantization, on
the real SmolLM2-135M.

Calibration and evaluation tokens as the default experiment cuts them (2048 Wikipedia tokens, 2048 held-out
LAMBADA tokens, sequences of 256); importance E[x²] per linear from the calibration tokens for every variant.
Variants of the covariance H = E[x xᵀ] compensation weighs by: over the experiment's 2048 tokens with GPTQ's
dampening 0.01 and with 1.0; over the first 16384 Wikipedia tokens with 0.1; the same with every token
scaled to unit mean square ('/n'). Per uniform plan (every block linear in the type or its legal fallback,
token table Q8_0): per linear the output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) under the calibration tokens' H
and the held-out tokens' H, and the model's KL to the base and perplexity on the held-out tokens.

    .venv/bin/python benchmarks/gptq.py        # writes benchmarks/results/gptq.txt/json (about 40 min, 1 core)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import DEFAULT_EXPERIMENT, table  # noqa: E402

PLANS = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "IQ4_NL")
# (calibration tokens H is taken over, dampening as a share of mean diag(H)): GPTQ's default dampening on the
# experiment's own 2048 tokens, a larger dampening on them, and more tokens (the experiment's 2048 first).
VARIANTS = ((2048, 0.01, False), (2048, 1.0, False), (16384, 0.1, False), (16384, 0.1, True))


def _rel_error(delta: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the output error's energy relative to the output's, under inputs of covariance H."""
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum())


def _label(tokens: int, damp: float, normalized: bool) -> str:
    return f"gptq {tokens}/{damp:g}{'/n' if normalized else ''}"


def run(plans: tuple[str, ...], variants: tuple[tuple[int, float], ...]) -> dict:
    from autosquash.compress.apply import compress
    from autosquash.compress.calibrate import collect_covariances, collect_stats
    from autosquash.compress.gptq import quantize_compensated
    from autosquash.compress.operators import deploy_linear
    from autosquash.compress.plan import Plan, deployed_tensors
    from autosquash.evaluate.proxy import reference, score
    from autosquash.evaluate.texts import load_texts, token_block
    from autosquash.formats.codecs import dequantize
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_model, load_tokenizer
    from autosquash.search.experiment import load_experiment
    from autosquash.search.trial import text_batch

    torch.set_num_threads(1)
    exp = load_experiment(DEFAULT_EXPERIMENT)
    base, tok = load_model(exp.model).float(), load_tokenizer(exp.model)
    arch = Arch.from_config(base.config)
    calib, held_out = text_batch(tok, exp.calibration), text_batch(tok, exp.evaluation)
    t0 = time.perf_counter()
    stats = collect_stats(base, calib)
    h_held = collect_covariances(base, held_out)
    texts = load_texts(exp.calibration.source)
    hessians = {
        (n, norm): collect_covariances(base, token_block(tok, texts, n, exp.calibration.seq_len), token_normalized=norm)
        for n, norm in sorted({(n, norm) for n, _, norm in variants} | {(calib.numel(), False)})
    }
    h_calib = hessians[calib.numel(), False]
    ref = reference(base, held_out)
    out: dict = {
        "model": exp.model,
        "calibration_tokens": calib.numel(),
        "held_out_tokens": held_out.numel(),
        "statistics_s": time.perf_counter() - t0,
        "plans": [],
    }
    print(f"statistics in {out['statistics_s']:.0f} s", flush=True)

    for quant in plans:
        plan = Plan.uniform(arch, quant, embed_quant="Q8_0")
        mb = sum(t.nbytes for t in deployed_tensors(arch, plan)) / 1e6
        model = compress(base, arch, plan, stats)
        row: dict = {"plan": quant, "mb": mb, "plain": score(model, ref), "variants": []}
        print(json.dumps(row), flush=True)
        linears = []  # (path, weight, deployed type, plain decoded weight)
        for i, layer in enumerate(base.model.layers):
            choice = plan.choice(f"blk.{i}.attn")  # uniform: every group's choice is the same
            for name, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    path, w = f"model.layers.{i}.{name}", m.weight.data.float()
                    qtype = deploy_linear(f"blk.{i}.{name.split('.')[-1]}", *w.shape, choice).type_of("weight")
                    linears.append((path, w, qtype, model.get_submodule(path).weight.data.float().clone()))
        for tokens, damp, norm in variants:
            per_type: dict[str, list] = {}
            t0 = time.perf_counter()
            for path, w, qtype, plain_w in linears:
                target = model.get_submodule(path)
                comp = dequantize(quantize_compensated(w, qtype, hessians[tokens, norm][path], stats[path], damp=damp))
                target.weight.data = comp.to(target.weight.dtype)
                per_type.setdefault(qtype, []).append(
                    [_rel_error(q - w, w, h) for q in (plain_w, comp) for h in (h_calib[path], h_held[path])]
                )
            quantize_s = time.perf_counter() - t0
            errors = {
                t: {
                    "count": len(rows),
                    "calib_error_plain_median": statistics.median(r[0] for r in rows),
                    "calib_error_gptq_median": statistics.median(r[2] for r in rows),
                    "held_out_error_plain_median": statistics.median(r[1] for r in rows),
                    "held_out_error_gptq_median": statistics.median(r[3] for r in rows),
                    "held_out_ratio_median": statistics.median(r[3] / r[1] for r in rows),
                    "held_out_lower": sum(r[3] < r[1] for r in rows),
                }
                for t, rows in per_type.items()
            }
            v = {"tokens": tokens, "damp": damp, "normalized": norm, **score(model, ref)}
            v.update(quantize_s=quantize_s, linears=errors)
            row["variants"].append(v)
            print(json.dumps(v), flush=True)
        out["plans"].append(row)
    return out


def report(out: dict) -> str:
    labels = [_label(v["tokens"], v["damp"], v["normalized"]) for v in out["plans"][0]["variants"]]
    body = [
        [p["plan"], f"{p['mb']:.1f}", f"{p['plain']['kl']:.4f}", *(f"{v['kl']:.4f}" for v in p["variants"])]
        + [f"{p['plain']['perplexity']:.2f}", *(f"{v['perplexity']:.2f}" for v in p["variants"])]
        for p in out["plans"]
    ]
    headers = ["plan", "MB", "KL plain", *(f"KL {lb}" for lb in labels), "ppl plain", *(f"ppl {lb}" for lb in labels)]
    layers = []
    for p in out["plans"]:
        for v in p["variants"]:
            for t, s in v["linears"].items():
                layers.append(
                    [
                        f"{p['plan']}: {t}, {_label(v['tokens'], v['damp'], v['normalized'])}",
                        s["count"],
                        f"{s['calib_error_plain_median']:.5f}",
                        f"{s['calib_error_gptq_median']:.5f}",
                        f"{s['held_out_error_plain_median']:.5f}",
                        f"{s['held_out_error_gptq_median']:.5f}",
                        f"{s['held_out_ratio_median']:.3f}",
                        f"{s['held_out_lower']}/{s['count']}",
                    ]
                )
    layer_headers = ["linears", "n", "calib plain", "calib gptq", "held plain", "held gptq", "held ratio", "lower"]
    note = (
        f"{out['model']}, uniform plans (block linears in the type or its legal fallback, token table Q8_0). KL "
        f"(nats/token) and perplexity on {out['held_out_tokens']} held-out LAMBADA tokens. Importance E[x²] from the "
        f"experiment's {out['calibration_tokens']} Wikipedia tokens for every variant; 'gptq N/d': compensated with "
        "H = E[x xᵀ] over the first N Wikipedia tokens, dampening d of mean diag(H); '/n': each token scaled to unit "
        "mean square in H (the default of calibration.error_compensation). Linear errors: median over the "
        "linears of each deployed type of tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), H over the experiment's calibration tokens "
        "('calib') or over the held-out ones ('held'); 'held ratio': median of gptq / plain held-out error; "
        "'lower': linears whose held-out error compensation lowered. SmolLM2 ships on a Q4_1 grid."
    )
    return table(headers, body) + "\n\n" + table(layer_headers, layers) + "\n\n" + note + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for gptq.txt/json")
    p.add_argument("--plans", nargs="+", default=list(PLANS), help="types of the uniform plans")
    args = p.parse_args()
    out = run(tuple(args.plans), VARIANTS)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "gptq.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / "gptq.txt").write_text(report(out))
    print(report(out))


if __name__ == "__main__":
    main()
