"""Per-tensor types against per-group types: the damage model's one-shot plan at each size, from a space whose
linears share their group's type and from the same space with each linear its own (`per_tensor`), scored on the
test split.

Each space's damage model is measured as a search measures it (calibration split, cached under --out); at each
target size the knapsack's plan no larger (no trials, no healing: what the allocation alone does) is built as a
trial builds it and scored on the experiment's test split, which nothing here selects on. Sizes are the files'
tensor bytes; the KV cache, which per-tensor choices do not change, is left out. The same targets for every space;
with --lattice a second pair of spaces adds IQ3_S .. IQ2_XXS to the FFN's types.

    .venv/bin/python benchmarks/per_tensor.py [--experiment experiments/smollm2-135m-iphone16.yaml] [--lattice]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from _common import DEFAULT_EXPERIMENT, OUT, ROOT, table, trial_context

LATTICE = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"]


def spaces(base, lattice: bool) -> dict:
    """The spaces compared, by label: the experiment's own, per group and per tensor (and with the lattice types)."""
    out = {"per group": base, "per tensor": base.model_copy(update={"per_tensor": ["attn", "ffn"]})}
    if lattice:
        ffn = base.ffn.model_copy(update={"quant": [*base.ffn.quant, *(t for t in LATTICE if t not in base.ffn.quant)]})
        wide = base.model_copy(update={"ffn": ffn, "name": f"{base.name}-lattice"})
        out |= {
            "lattice, per group": wide,
            "lattice, per tensor": wide.model_copy(update={"per_tensor": ["attn", "ffn"]}),
        }
    return {k: type(base).model_validate(v.model_dump()) for k, v in out.items()}  # validated again


def main() -> None:
    import optuna

    from autosquash.compress.apply import VariantCache, compress
    from autosquash.compress.plan import deployed_tensors
    from autosquash.evaluate.proxy import score
    from autosquash.models.load import resolve_model
    from autosquash.search.experiment import load_experiment
    from autosquash.search.profile import cached_profile
    from autosquash.search.sensitivity import _lossless_size, _smallest, best_under
    from autosquash.search.space import SearchSpace

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT))
    p.add_argument("--out", default=str(OUT / "per_tensor"), help="folder for the caches")
    p.add_argument("--sizes", type=int, default=10, help="target sizes, evenly spread over the per-group range")
    p.add_argument("--lattice", action="store_true", help="also the spaces with IQ3_S .. IQ2_XXS among the FFN types")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"))
    p.add_argument(
        "--allocator",
        help="folder of llama.cpp's --target-size llama-quantize and llama-imatrix: also export the per-group and the "
        "last per-tensor space's plans, score them with llama-perplexity, beside the allocator's file at each size",
    )
    args = p.parse_args()

    exp = load_experiment(args.experiment)
    out = Path(args.out)
    inputs, ctx = trial_context(exp, out, workers=1)
    model = resolve_model(exp.model)
    cache = VariantCache(max_bytes=2 << 30)
    profiles, measure_s = {}, {}
    for label, space in spaces(SearchSpace.load(exp.search_space), args.lattice).items():
        start = time.perf_counter()
        profiles[label] = (space, cached_profile(
            ctx.base, ctx.arch, space, ctx.stats, ctx.calib_ref, exp.context_tokens, model.key, out / "cache", cache
        ))  # fmt: skip
        measure_s[label] = time.perf_counter() - start
    group = profiles["per group"][1]
    lo, hi = group.size(*_smallest(group)), _lossless_size(group, group.size(*_smallest(group)))
    targets = [lo + (hi - lo) * k // (args.sizes - 1) for k in range(args.sizes)]
    rows, plans = [], {}
    for target in targets:
        row = {"target_mb": target / 1e6}
        for label, (space, profile) in profiles.items():
            picks = best_under(profile, target)
            if picks is None:
                continue
            plan = space.sample(optuna.trial.FixedTrial(profile.params(*picks)), ctx.arch)
            quality = score(compress(ctx.base, ctx.arch, plan, ctx.stats, cache), ctx.test_ref)
            plans[(target, label)] = plan
            mixed = sum(bool(c.tensor_quant) for c in plan.groups.values())
            row[label] = {
                "mb": sum(t.nbytes for t in deployed_tensors(ctx.arch, plan)) / 1e6,
                "kl": quality["kl"],
                "predicted": profile.damage(*picks),
                "mixed_groups": mixed,
            }
            print(f"  {target / 1e6:.1f} MB {label}: {row[label]}", flush=True)
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    text = report(rows, list(profiles), measure_s, exp, commit.strip())
    llama = []
    if args.allocator:
        labels = ["per group", list(profiles)[-1]]
        llama = llama_cpp_rows(exp, plans, labels, Path(args.allocator), out / "llama")
        text += "\n\n" + llama_cpp_report(llama, labels)
    print(text)
    results = Path(args.results)
    (results / "per_tensor.txt").write_text(text + "\n")
    (results / "per_tensor.json").write_text(
        json.dumps({"commit": commit.strip(), "measure_s": measure_s, "rows": rows, "llama_cpp": llama}, indent=1)
        + "\n"
    )


def llama_cpp_rows(exp, plans: dict, labels: list[str], allocator: Path, work: Path) -> list[dict]:
    """Each target's plans of `labels` exported and scored by llama-perplexity on the test text, beside the
    allocator's file asked for the last label's file size (vs_llamacpp.py's texts, base logits and scoring)."""
    import sys

    from vs_llamacpp import _mb, _run, allocator_files, base_gguf, base_logits, score, texts, tools

    from autosquash.yaml_io import dump_yaml_model

    work.mkdir(parents=True, exist_ok=True)
    bin_dir, (calib, test) = tools(), texts(exp, work)
    base, kld_base = work / "base-f32.gguf", work / "base.kld"
    if not base.exists():
        base_gguf(exp, base)
    base_logits(bin_dir, base, test, kld_base)
    rows, seen = [], set()
    for target in sorted({t for t, _ in plans}):
        key = (target, labels[-1])
        if key not in plans or plans[key].model_dump_json() in seen:
            continue  # a plan already scored at a smaller target
        seen.add(plans[key].model_dump_json())
        row = {"target_mb": target / 1e6}
        for k, label in enumerate(labels):
            plan_file, path = work / f"plan-{target}-{k}.yaml", work / f"plan-{target}-{k}.gguf"
            dump_yaml_model(plans[(target, label)], plan_file)
            cmd = [sys.executable, "-m", "autosquash", "export", "--model", exp.model, "--plan", plan_file]
            _run([*cmd, "--out", path], path.with_suffix(".export.log"))
            row[label] = {"mb": _mb(path), **score(bin_dir, path, test, kld_base, path.with_suffix(".log"))}
        (a,) = allocator_files(
            allocator, base, calib, [{"trial": target, "mb": row[labels[-1]]["mb"]}], work, exp.calibration.seq_len
        )
        row["allocator"] = {
            "mb": _mb(a["path"]),
            **score(bin_dir, a["path"], test, kld_base, a["path"].with_suffix(".log")),
        }
        print(f"  llama.cpp at {target / 1e6:.1f} MB: {row}", flush=True)
        rows.append(row)
    return rows


def llama_cpp_report(rows: list[dict], labels: list[str]) -> str:
    head = ["budget MB"] + [x for label in labels for x in (f"{label} MB", "KL")]
    head += ["allocator MB", "its KL", f"{labels[-1]} / allocator"]
    body = []
    for r in rows:
        line = [f"{r['target_mb']:.2f}"] + [
            x for label in labels for x in (f"{r[label]['mb']:.2f}", f"{r[label]['kl']:.4f}")
        ]
        a = r["allocator"]
        line += [f"{a['mb']:.2f}", f"{a['kl']:.4f}", f"{r[labels[-1]]['kl'] / max(a['kl'], 1e-12):.2f}"]
        body.append(line)
    return "\n".join(
        [
            "The same one-shot plans exported (no adapter) and scored by llama-perplexity --kl-divergence on",
            "vs_llamacpp.py's test text (LAMBADA passages after the search's evaluation set, 512-token windows),",
            "beside llama-quantize --target-size asked for the last plan's file size, with its own importance",
            "matrix (MB: whole files).",
            table(head, body),
        ]
    )


def report(rows: list[dict], labels: list[str], measure_s: dict, exp, commit: str) -> str:
    head = ["budget MB"]
    for label in labels:
        head += [f"{label} MB", "KL", "mixed"] + ([] if label == "per group" else ["KL ratio"])
    body = []
    for r in rows:
        line = [f"{r['target_mb']:.2f}"]
        ref = r.get("per group")
        for label in labels:
            x = r.get(label)
            line += ["", "", ""] if x is None else [f"{x['mb']:.2f}", f"{x['kl']:.4f}", str(x["mixed_groups"])]
            if label != "per group":
                line.append("" if x is None or ref is None else f"{x['kl'] / max(ref['kl'], 1e-12):.2f}")
        body.append(line)
    took = ", ".join(f"{k} {v:.0f} s" for k, v in measure_s.items())
    return "\n".join(
        [
            f"benchmarks/per_tensor.py at {commit}: {exp.name}, the damage model's one-shot plan no larger than each",
            "target (no trials, no healing), KL on the test split; MB: the file's tensors; mixed: groups whose",
            "linears differ in type; ratio: KL against the per-group plan at the same target. Budget: the knapsack's,",
            "the KV cache at the experiment's context included (SmolLM2 at 2,048 tokens: 47.2 MB).",
            f"damage models measured (0 s: read from the cache): {took}",
            table(head, body),
        ]
    )


if __name__ == "__main__":
    main()
