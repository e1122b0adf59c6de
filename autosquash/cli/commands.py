"""The subcommands that read, price, score, write and fetch models, and run searches: search, estimate, phones, fetch,
eval, export, pull, report."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from autosquash.cli.common import (
    CACHE_DIR,
    check_finite,
    print_json,
    writable_file,
    writable_folder,
)
from autosquash.errors import AutosquashError, DeprecatedInput

if TYPE_CHECKING:
    from autosquash.models.load import ResolvedModel


def search_command(args: argparse.Namespace) -> int:
    from autosquash.search.experiment import load_experiment, resolve_path
    from autosquash.search.model_experiment import model_experiment, remove_space, write_space
    from autosquash.search.outputs import print_front
    from autosquash.search.study import SearchOptions, run_search

    if args.force and not args.resume:
        raise AutosquashError("--force only applies to --resume (it resumes a search whose settings changed)")
    made = None
    if args.experiment:
        exp = load_experiment(args.experiment)
        given = {"model": args.model, "phone": args.phone}
        exp = exp.model_copy(update={k: resolve_path(v, Path.cwd()) for k, v in given.items() if v})
    elif args.model:
        made = model_experiment(args.model, args.phone)
        exp = made.experiment
    else:
        raise AutosquashError(
            "search needs an experiment file (e.g. experiments/smoke.yaml) or --model M [--phone P] (the default "
            "experiment's settings for your model and phone)"
        )
    out = writable_folder(Path(args.out or Path("runs") / exp.name), "--out", create=False)
    fresh = not out.exists()
    if made is not None and made.space is not None:
        exp = made.in_folder(out)
        print(made.note, flush=True)
        write_space(made, out)  # in the output folder, where --resume finds the same space
    if args.sampler:
        exp = exp.model_copy(update={"sampler": args.sampler})
    opts = SearchOptions(
        out_dir=out,
        trials=args.trials or exp.trials,
        workers=args.workers or exp.workers,
        ray_address=args.ray_address,
        resume=args.resume,
        force=args.force,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
    )
    try:
        front = run_search(exp, opts)
    except BaseException:
        if fresh and made is not None:
            remove_space(made, out)  # written before the search's own checks, which read it
        raise
    print_front(front, exp, out)
    if not front:
        raise AutosquashError(why_no_front(out, exp.phone))
    return 0


def why_no_front(out: Path, phone: str) -> str:
    """Why a finished search has an empty front: every trial failed, or no plan fits the phone."""
    import csv

    with (out / "trials.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        errors = sorted({r["error"] for r in rows if r["error"]})
        first = errors[0] if errors else "no error recorded"
        return f"every one of the {len(rows)} trials failed (first error: {first}); see {out / 'trials.csv'}"
    smallest = min(done, key=lambda r: float(r["memory_mb"]))
    return (
        f"no plan of the {len(done)} finished trials fits {phone}: the smallest needs "
        f"{float(smallest['memory_mb']):.0f} MB at run time (trial {smallest['trial']}); choose a phone with more "
        "memory, a shorter context_tokens or a space with smaller types"
    )


def estimate_command(args: argparse.Namespace) -> int:
    from autosquash.compress.plan import Plan, check_plan, deployed_tensors, kv_heads_per_layer
    from autosquash.cost import estimate, file_tensors, format_report, load_phone
    from autosquash.models.load import resolve_model
    from autosquash.yaml_io import load_yaml_model

    if args.old_device:
        warnings.warn(
            "estimate --device is deprecated: it names the phone; write --phone", DeprecatedInput, stacklevel=2
        )
    phone = load_phone(args.phone or args.old_device)
    model = resolve_model(args.model)
    src = model.source
    if src.kind == "gguf" and not args.plan and args.uniform is None:
        # A GGUF file is priced as it is stored: its own tensors and types, its blocks' KV heads.
        arch, tensors, kv_heads = file_tensors(Path(src.location, src.gguf_file))
    else:
        arch = model.arch
        if args.plan:
            plan = check_plan(load_yaml_model(Plan, args.plan), arch, args.plan)
        else:
            plan = Plan.uniform(arch, "F16" if args.uniform is None else args.uniform)
        tensors, kv_heads = deployed_tensors(arch, plan), kv_heads_per_layer(arch, plan)
    report = estimate(arch, tensors, phone, context_tokens=args.context, kv_heads_per_layer=kv_heads)
    if args.json:
        print_json(report.to_dict(), indent=2)
    else:
        check_finite(report.to_dict())
        print(format_report(report, phone))
    return 0


def phones_command(args: argparse.Namespace) -> int:
    from autosquash.cost import list_phones

    phones = list_phones()
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in phones], indent=2))
        return 0
    print(f"{'name':20s} {'DRAM':>7s} {'app limit':>10s} {'bandwidth':>11s} {'battery':>9s}")
    for p in phones:
        print(
            f"{p.name:20s} {p.dram_bytes / 2**30:5.1f} GiB {p.app_memory_limit_bytes / 2**30:6.1f} GiB "
            f"{p.peak_bandwidth_bytes_per_s / 1e9:7.1f} GB/s {p.battery_j / 1e3:6.1f} kJ"
        )
    return 0


def devices_command(args: argparse.Namespace) -> int:
    warnings.warn(
        "`autosquash devices` is deprecated: it lists phones; write `autosquash phones`", DeprecatedInput, stacklevel=2
    )
    return phones_command(args)


def fetch_command(args: argparse.Namespace) -> int:
    from autosquash.models.assets import ASSETS, asset_path, assets_dir, fetch

    if args.list:
        print(f"{'name':20s} {'size':>9s}  {'model':38s} file (in {assets_dir()})")
        for name, asset in ASSETS.items():
            found = asset_path(name)
            print(
                f"{name:20s} {asset.size_bytes / 1e6:6.0f} MB  {asset.description:38s} "
                f"{found.name if found else 'not fetched'}"
            )
        return 0
    if not args.names:
        raise AutosquashError(f"name an asset to fetch ({', '.join(ASSETS)}), or pass --list")
    for name in args.names:
        fetch(name, progress=lambda line: print(line, flush=True))
    return 0


def _eval_tasks(args: argparse.Namespace) -> list[str]:
    """The lm-eval tasks `eval` is asked for, once its arguments are checked (one line each where they are bad)."""
    if not (args.tasks or args.text):
        raise AutosquashError(
            "eval needs --tasks a,b,... (lm-eval) or --text FILE (or a shipped source: wikipedia, lambada)"
        )
    if args.limit is not None and args.limit < 1:
        raise AutosquashError(f"--limit must be at least 1 example per task, got {args.limit}")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise AutosquashError(f"--tasks {args.tasks!r} names no task")
    least = 3 if args.score == "second-half" else 2  # a window's first token is predicted by nothing;
    if args.text and args.seq_len < least:  # second-half scores from position seq_len // 2 on
        raise AutosquashError(
            f"--seq-len {args.seq_len}: a window must hold at least {least} tokens to score one prediction"
            + (" with --score second-half" if args.score == "second-half" else "")
        )
    if args.lora and not Path(args.lora).is_file():
        raise AutosquashError(f"LoRA adapter {args.lora} does not exist")
    return tasks


def eval_command(args: argparse.Namespace) -> int:
    from autosquash.models.load import load_model, load_tokenizer, resolve_model

    tasks = _eval_tasks(args)
    base_model = resolve_model(args.model)
    tok = load_tokenizer(base_model)
    if base_model.source.kind == "torch":  # a compressed model: only the operators know its linears
        from autosquash.export.torch_file import load

        model = load(args.model)[0]
    else:
        model = load_model(base_model)
    if args.lora:
        model = with_lora(model, base_model, args.lora)
    result: dict = {}
    if tasks:
        from autosquash.evaluate.benchmark import run_tasks

        result["tasks"] = run_tasks(model, tok, tasks, args.limit)
    if args.text:
        from autosquash.evaluate.proxy import perplexity
        from autosquash.evaluate.texts import load_texts, token_block

        batch = token_block(tok, load_texts(args.text), args.tokens, args.seq_len)
        first = 0
        if args.score == "second-half":  # llama-perplexity's windows (a BOS first where the model wants one)
            first = args.seq_len // 2
        scored = batch.shape[0] * (args.seq_len - 1 - first)
        result.update(perplexity=perplexity(model, batch, first), tokens=int(batch.numel()), scored=scored)
    result.update(model=args.model, limit=args.limit)
    if args.lora:
        result["lora"] = args.lora
    if args.json:
        print_json(result)
        return 0
    check_finite(result)
    name = f"{args.model} + {args.lora}" if args.lora else args.model
    if tasks:
        from autosquash.evaluate.benchmark import format_table

        limit = f"first {args.limit} examples of each task" if args.limit else "all examples"
        print(f"{name}, zero-shot, {limit}\n{format_table(result['tasks'])}")
    if args.text:
        print(f"perplexity {result['perplexity']:.3f} on {result['tokens']} tokens ({result['scored']} scored)")
    return 0


def with_lora(model, base_model: ResolvedModel, lora: str):
    """`model` with the GGUF LoRA adapter `lora` applied, as llama.cpp's --lora applies it."""
    from autosquash.export.lora import apply_adapter, read_gguf_lora
    from autosquash.formats.gguf import gguf_architecture

    src, spec = base_model.source, base_model.spec
    if src.kind == "torch":
        raise AutosquashError(f"{spec} is a torch-format file, which carries its adapter inside; --lora is for GGUF")
    adapter, alpha, adapter_arch = read_gguf_lora(lora)
    if src.kind == "gguf":
        model_arch = gguf_architecture(Path(src.location, src.gguf_file))
        if model_arch != adapter_arch:
            raise AutosquashError(f"{lora} adapts a {adapter_arch} model; {spec} is {model_arch}")
    return apply_adapter(model, adapter, alpha)


def export_command(args: argparse.Namespace) -> int:
    from autosquash.compress.plan import Plan
    from autosquash.export.build import plan_model
    from autosquash.search.rebuild import rebuild_trial
    from autosquash.yaml_io import load_yaml_model

    if args.register and not args.run:
        raise AutosquashError("--register needs --run DIR --trial N: a model version links to its trial's run")
    out = Path(args.out)
    if args.format == "gguf" and out.suffix != ".gguf":
        raise AutosquashError(f"--out {out}: a GGUF file's name ends in .gguf")
    if args.format == "torch" and out.suffix in (".gguf", ".json"):
        raise AutosquashError(f"--out {out}: --format torch writes safetensors; name it e.g. model.safetensors")
    writable_file(out, "--out")  # before minutes of building, not after
    if args.register:
        registered_trial_run(Path(args.run), args.trial)  # the version's run must exist before the file is built
    exp = plan_file = None
    if args.run:
        if args.trial is None:
            raise AutosquashError("--run needs --trial N")
        built, exp, plan_file = rebuild_trial(Path(args.run), args.trial)
    else:
        if not args.model or (args.plan is None and args.uniform is None):
            raise AutosquashError("export needs --run DIR --trial N, or --model M with --plan FILE or --uniform TYPE")
        from autosquash.models.load import resolve_model

        plan, model = args.uniform, resolve_model(args.model)
        if args.plan:  # checked against the model's config before the weights load
            from autosquash.compress.plan import check_plan

            plan = check_plan(load_yaml_model(Plan, args.plan), model.arch, args.plan)
        built = plan_model(model, plan, CACHE_DIR)
    files, counts, healing = write_export(out, args.format, built)
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    for f in files:
        print(f"wrote {f}: {f.stat().st_size / 1e6:.1f} MB")
    print(f"tensors: {types}" + (f"; healing: {healing}" if healing else ""))
    if args.register:
        register_export(args, exp, plan_file, files, healing)
    return 0


def write_export(out: Path, fmt: str, built) -> tuple[list[Path], dict[str, int], str | None]:
    """Write `built` as `fmt`: (files written, tensors per type, where the trial's LoRA healing went)."""
    from autosquash.export.gguf_file import gguf_arch, write_gguf
    from autosquash.export.lora import adapter_weights, lora_path, write_gguf_lora
    from autosquash.export.torch_file import save

    b = built
    merged = "the trial's LoRA healing, merged into the weights" if b.healing == "merged" else None
    if fmt == "torch":
        counts = save(out, b)
        return [out], counts, f"the trial's LoRA healing, inside {out.name}" if b.healing == "adapter" else merged
    counts = write_gguf(out, b)
    if b.healing != "adapter":
        return [out], counts, merged
    lora = lora_path(out)
    adapter, alpha = adapter_weights(b.model)
    write_gguf_lora(lora, adapter, alpha, b.arch, gguf_arch(b.arch, b.plan))
    return [out, lora], counts, f"the trial's LoRA healing, in {lora.name} (llama.cpp: --lora {lora.name})"


def registered_trial_run(run: Path, trial: int | None):
    """(tracking URI, MLflow run) of trial `trial` of the search in `run`, which a registered version links to."""
    from autosquash.search.experiment import load_experiment
    from autosquash.track.mlflow_store import find_trial_run, search_tracking_uri

    if trial is None:
        raise AutosquashError("--run needs --trial N")
    tracking_uri = search_tracking_uri(run)
    if tracking_uri is None or not (run / "experiment.yaml").is_file():
        raise AutosquashError(f"{run} is not a search's output folder (no tracking_uri.txt or experiment.yaml)")
    trial_run = find_trial_run(tracking_uri, load_experiment(run / "experiment.yaml").name, trial)
    if trial_run is None:
        raise AutosquashError(f"the MLflow store of {run} holds no run of trial {trial}")
    return tracking_uri, trial_run


def register_export(args: argparse.Namespace, exp, plan_file: Path, files: list[Path], healing: str | None) -> None:
    from autosquash.track.registry import register

    tracking_uri, trial_run = registered_trial_run(Path(args.run), args.trial)
    metrics = trial_run.data.metrics
    tags = {
        k: f"{metrics[k]:.6g}"
        for k in (
            "perplexity",
            "kl",
            "peak_memory_bytes",
            "energy_j_per_token",
            "decode_tokens_per_s",
            "bits_per_weight",
            "hours_continuous_generation",
        )
        if k in metrics
    }
    tags["size_mb"] = f"{sum(f.stat().st_size for f in files) / 1e6:.1f}"
    if healing:
        tags["lora_adapter"] = healing
    tags.update(
        {
            "phone": exp.phone,
            "model": exp.model,
            "search": exp.name,
            "trial": str(args.trial),
            "plan": plan_file.read_text()[:5000],
            "format": args.format,
            "files": ", ".join(f.name for f in files),
        }
    )
    version = register(tracking_uri, args.register, [*files, plan_file], trial_run.info.run_id, tags)
    print(
        f"registered {args.register} version {version}; pull it with: autosquash pull models:/{args.register}/"
        f"{version} --out DIR"
    )


def pull_command(args: argparse.Namespace) -> int:
    from autosquash.track.registry import pull

    files = pull(args.model_uri, writable_folder(Path(args.out), "--out"), args.tracking_uri, Path(args.runs))
    print(f"pulled {args.model_uri} into {args.out}: {', '.join(f.name for f in files)}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from autosquash.search.report import write_report

    run = Path(args.run)
    out = write_report(run, Path(args.out) if args.out else run / "report.html")
    print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB; open it in a browser (it needs no network)")
    return 0
