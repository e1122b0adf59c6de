"""How a search scales with the model: random-weight Llama configs of SmolLM2-135M's shape, about 360M and
about 1.1B (Llama-3.2-1B's shape with SmolLM2's tokenizer and vocabulary), each searched with the default
experiment's space and sampler for as many trials as it runs (24: its uniform baselines, then the sampler's
plans) on one worker.

Per size, side by side: model load, calibration statistics, reference logits, the uniform baselines' layers
(made once, before the profile and the trials: `layers s`), the sensitivity profile, a trial split into
build / heal / score, one plain forward pass over the evaluation tokens (the floor), the
peak memory of driver and worker and the variant cache's bytes; then the ratios to the 135M row and to the
floor. A trial's build is the quantization of the variants the variant store lacked (`quant s`: once per
layer and type in a search; since the baselines' layers are made before the trials, what a sampled plan's
pruned layers need) plus assembling the model from them. `warm`: the search's first plan evaluated again
after the search, without healing, in a fresh cache whose layers come from the search's variant store on
disk (what a worker finds that another worker, or an earlier trial, made): a trial's whole cost outside
healing once its layers exist (`warm trial/fwd`). A trial outside its healing is reported for the search's
first trial, as the median and as the mean over the search. Each size runs in
a fresh process (its own driver peak); the forward floor and the warm trial are timed there after the
search, with the trials' torch thread count.

    .venv/bin/python benchmarks/scale.py                       # all three sizes, CPU unless CUDA is seen
    .venv/bin/python benchmarks/scale.py --sizes 135m --trials 3 --device cpu   # a quick look
    .venv/bin/python benchmarks/scale.py --sizes tiny --trials 1 --experiment experiments/smoke.yaml  # plumbing
Writes benchmarks/results/scale.txt and scale.json (one object per size). `tiny` (the tests' 2-block shape) and
`--experiment` (another experiment's settings, its model replaced by the size's) exist for benchmarks/gpu_check.sh's
dry run, which checks in seconds that the benchmark still runs; they measure nothing worth keeping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import DEFAULT_EXPERIMENT, table  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer, which every size uses (offline)
SIZES = {
    "tiny": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "360m": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5
    ),
    "1.1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


def _config(size: str) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **SIZES[size],
    }


def run_one(size: str, trials: int, device: str, folder: Path, experiment: Path = DEFAULT_EXPERIMENT) -> dict:
    """One size's search (in this process) with `experiment`'s settings, and its forward floor; the measurements
    as one object."""
    import dataclasses

    import torch
    from mlflow.tracking import MlflowClient

    from autosquash.compress.apply import VariantCache
    from autosquash.compress.plan import Plan
    from autosquash.evaluate.heal import HealConfig
    from autosquash.evaluate.proxy import reference
    from autosquash.search.experiment import load_experiment
    from autosquash.search.study import SearchOptions, run_search
    from autosquash.search.trial import evaluate_plan, load_inputs, open_store, prepare_context
    from autosquash.track.mlflow_store import search_tracking_uri
    from autosquash.yaml_io import load_yaml_model

    (folder / "config.json").write_text(json.dumps(_config(size)))
    exp = load_experiment(experiment).model_copy(
        update={"model": str(folder / "config.json"), "name": f"scale-{size}", "benchmark": {"tasks": []}}
    )
    exp = exp.model_validate({**exp.model_dump(), "hardware": {"device": device}})
    out = folder / "run"
    run_search(exp, SearchOptions(out_dir=out, trials=trials, workers=1))
    client = MlflowClient(tracking_uri=search_tracking_uri(out))
    (experiment,) = [e for e in client.search_experiments() if e.name == exp.name]
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("autosquash.role") == "search").data.metrics
    trial_runs = [r for r in runs if r.data.tags.get("autosquash.role") == "trial"]
    # In the order the search ran them.
    trial_runs = [r.data.metrics for r in sorted(trial_runs, key=lambda r: int(r.data.tags["autosquash.trial"]))]
    # The floor: one plain forward of the base model over the evaluation tokens, with a trial's threads.
    torch.set_num_threads(int(trial_runs[0]["torch_threads"]))
    inputs = load_inputs(exp, out)  # the search's base model, statistics and variant store
    base, held_out = inputs.base, inputs.held_out
    reference(base, held_out[:1], 1)  # warm-up
    t0 = time.perf_counter()
    reference(base, held_out, exp.topk)
    forward_s = time.perf_counter() - t0
    # A trial whose variants exist: the search's first plan again in a fresh process-level cache, its
    # layers read from the search's variant store (what another worker, or a later trial, finds there).
    # Without healing: the figure is what a trial costs outside it.
    ctx = dataclasses.replace(prepare_context(exp, inputs, workers=1), heal=HealConfig(steps=0))
    warm_cache = VariantCache(max_bytes=ctx.variant_cache_bytes, store=open_store(ctx))
    plan = load_yaml_model(Plan, out / "plans" / "trial-0000.yaml")
    warm = evaluate_plan(ctx, plan, exp.seed, warm_cache)
    keys = ("build_s", "quantize_s", "assemble_s", "heal_s", "eval_s", "trial_s")
    med = {k: statistics.median(m.get(k, 0.0) for m in trial_runs) for k in keys}
    # A trial outside its healing: build (quantizing what the store lacks, then assembling) + score + the
    # bookkeeping around them; per trial, in the order the search ran them.
    outside = [m["trial_s"] - m.get("heal_s", 0.0) for m in trial_runs]
    quantized = [m.get("quantize_s", 0.0) for m in trial_runs]
    return {
        "size": size,
        "params": sum(p.numel() for p in base.parameters()),
        "device": str(next(base.parameters()).device),
        "trials": len(trial_runs),
        "load_s": parent["load_s"],
        "calibration_s": parent["calibration_s"],
        "reference_s": parent["reference_s"],
        "profile_s": parent.get("profile_s", 0.0),
        "baseline_layers_s": parent.get("variants_s", 0.0),  # the baselines' layers, made before the trials
        "forward_s": forward_s,
        "build_s": med["build_s"],
        "quantize_s": med["quantize_s"],
        "assemble_s": med["assemble_s"],
        "heal_s": med["heal_s"],
        "score_s": med["eval_s"],
        "trial_s": med["trial_s"],
        "peak_worker_rss_bytes": max(m["peak_worker_rss_bytes"] for m in trial_runs),
        "peak_driver_rss_bytes": parent["peak_driver_rss_bytes"],
        "variant_cache_bytes": max(m["variant_cache_bytes"] for m in trial_runs),
        "variant_store_bytes": max(m.get("variant_store_bytes", 0.0) for m in trial_runs),
        "warm_build_s": warm["build_s"],
        "warm_quantize_s": warm["quantize_s"],
        "warm_score_s": warm["eval_s"],
        "warm_trial_s": warm["trial_s"],  # no healing
        "warm_stored_hits": warm.get("cache_stored_hits", 0),
        "outside_heal_s": outside,  # per trial, in trial order
        "quantize_s_per_trial": quantized,
        "outside_heal_median_s": statistics.median(outside),
        "outside_heal_mean_s": statistics.fmean(outside),
        "quantize_total_s": sum(quantized),
    }


def report(rows: list[dict]) -> str:
    """The table of measurements, then the ratios to the first row and to each row's forward floor."""
    gb = 1e9
    head = [
        "size",
        "params",
        "device",
        "load s",
        "calib s",
        "layers s",
        "profile s",
        "forward s",
        "build s",
        "quant s",
        "heal s",
        "score s",
        "trial s",
        "worker GB",
        "driver GB",
        "cache GB",
        "store GB",
        "warm build s",
        "quant total s",
    ]
    body = [
        [
            r["size"],
            f"{r['params'] / 1e6:.0f}M",
            r["device"],
            f"{r['load_s']:.1f}",
            f"{r['calibration_s']:.1f}",
            f"{r.get('baseline_layers_s', 0.0):.1f}",
            f"{r['profile_s']:.1f}",
            f"{r['forward_s']:.1f}",
            f"{r['build_s']:.1f}",
            f"{r['quantize_s']:.1f}",
            f"{r['heal_s']:.1f}",
            f"{r['score_s']:.1f}",
            f"{r['trial_s']:.1f}",
            f"{r['peak_worker_rss_bytes'] / gb:.2f}",
            f"{r['peak_driver_rss_bytes'] / gb:.2f}",
            f"{r['variant_cache_bytes'] / gb:.2f}",
            f"{r.get('variant_store_bytes', 0) / gb:.2f}",
            f"{r.get('warm_build_s', float('nan')):.1f}",
            f"{r.get('quantize_total_s', float('nan')):.0f}",
        ]
        for r in rows
    ]
    first = rows[0]
    ratio_head = [
        "size",
        "params x",
        "forward x",
        "profile x",
        "trial x",
        "worker mem x",
        "layers/fwd",
        "profile/fwd",
        "heal/fwd",
        "score/fwd",
        "first trial/fwd",
        "median trial/fwd",
        "mean trial/fwd",
        "warm trial/fwd",
    ]
    ratios = []
    for r in rows:
        fwd = r["forward_s"]
        outside = r.get("outside_heal_s") or [r["trial_s"] - r["heal_s"]]  # rows written before 8f876b0
        ratios.append(
            [
                r["size"],
                f"{r['params'] / first['params']:.1f}",
                f"{fwd / first['forward_s']:.1f}",
                f"{r['profile_s'] / max(first['profile_s'], 1e-9):.1f}",
                f"{r['trial_s'] / first['trial_s']:.1f}",
                f"{r['peak_worker_rss_bytes'] / first['peak_worker_rss_bytes']:.1f}",
                f"{r.get('baseline_layers_s', 0.0) / fwd:.1f}",
                f"{r['profile_s'] / fwd:.1f}",
                f"{r['heal_s'] / fwd:.2f}",
                f"{r['score_s'] / fwd:.2f}",
                f"{outside[0] / fwd:.2f}",
                f"{statistics.median(outside) / fwd:.2f}",
                f"{statistics.fmean(outside) / fwd:.2f}",
                f"{r.get('warm_trial_s', float('nan')) / fwd:.2f}",
            ]
        )
    return (
        table(head, body)
        + f"\n\nRatios to the {first['size']} row and to each size's forward floor. Trial columns: medians over"
        + " the search's trials; `trial/fwd`: a trial outside its healing (build + score + bookkeeping), for the"
        + " search's first trial, its median and mean trial, and the warm re-run\n"
        + table(ratio_head, ratios)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="135m,360m,1.1b", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--trials", type=int, default=24, help="trials per size (default 24, as the default experiment)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--experiment", default=str(DEFAULT_EXPERIMENT), help="the settings searched (default: %(default)s)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process, print JSON
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for scale.txt/json")
    args = p.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as d:
            row = run_one(args.one, args.trials, args.device, Path(d), Path(args.experiment))
            print("SCALE " + json.dumps(row), flush=True)
        return
    rows = []
    for size in args.sizes.split(","):
        print(f"--- {size}", flush=True)
        cmd = [sys.executable, __file__, "--one", size, "--trials", str(args.trials), "--device", args.device]
        cmd += ["--experiment", args.experiment]
        run = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith("SCALE ")), None)
        if run.returncode != 0 or line is None:
            sys.exit(f"scale: the {size} run failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        rows.append(json.loads(line.removeprefix("SCALE ")))
        print(report(rows), flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / "scale.txt").write_text(report(rows) + "\n")
    print(f"wrote {results / 'scale.txt'} and {results / 'scale.json'}")


if __name__ == "__main__":
    main()
